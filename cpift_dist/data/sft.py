"""Task data for SFT: local files through ``datasets``, rendered with the chat template.

Shapes: ``alpaca`` (instruction, input, output) and ``messages`` (a list of {role, content});
a column mapping renames a file's fields to these. Rendering: the conversation through the
tokenizer's chat template; only the last assistant turn is supervised (labels = -100 on every
token before it). Truncation policy: an example longer than ``max_length`` keeps its first
``max_length`` tokens (the response is cut at the end); an example whose prompt alone fills
``max_length`` has nothing to learn from and is dropped (counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cpift_dist.errors import CpiftError

IGNORE = -100
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
FIELDS = {"alpaca": ("instruction", "input", "output"), "messages": ("messages",)}


def load_records(path: str | Path, shape: str = "auto", columns: dict[str, str] | None = None,
                 rows: list | None = None) -> list[list[dict]]:
    """Reads a task file and returns its examples as conversations (lists of messages).

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file.
        shape: ``alpaca``, ``messages`` or ``auto`` (from the fields present).
        columns: file field -> shape field (e.g. ``{"question": "instruction"}``).
        rows: when given, receives the raw records (after renames), in file order (scorers).

    Raises:
        CpiftError: a missing or unreadable file, an empty dataset, or records without the
            shape's fields (naming the field and the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CpiftError(f"{path}: task data file does not exist")
    kind = _LOADERS.get(path.suffix)
    if kind is None:
        raise CpiftError(f"{path}: unsupported data file type (use .jsonl, .json or .parquet)")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several types
        first = (str(e).splitlines() or [""])[0][:200]
        raise CpiftError(f"{path}: cannot read task data ({type(e).__name__}: {first})") from None
    if columns:
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise CpiftError(f"{path}: mapped column {missing[0]!r} is not in the file "
                             f"(columns: {', '.join(ds.column_names)})")
        ds = ds.rename_columns(columns)
    if len(ds) == 0:
        raise CpiftError(f"{path}: the dataset is empty")
    if shape == "auto":
        shape = "messages" if "messages" in ds.column_names else "alpaca"
    if shape not in FIELDS:
        raise CpiftError(f"{path}: unknown data shape {shape!r} (alpaca or messages)")
    required = [f for f in FIELDS[shape] if f != "input"]
    for f in required:
        if f not in ds.column_names:
            raise CpiftError(f"{path}: records have no field {f!r} needed by the {shape} shape "
                             f"(fields: {', '.join(ds.column_names)})")
    out = []
    for i, rec in enumerate(ds):
        if shape == "alpaca":
            if not isinstance(rec["instruction"], str) or not isinstance(rec["output"], str):
                raise CpiftError(f"{path}: record {i}: 'instruction' and 'output' must be text")
            prompt = rec["instruction"]
            if rec.get("input"):
                prompt += "\n\n" + rec["input"]
            out.append([{"role": "user", "content": prompt},
                        {"role": "assistant", "content": rec["output"]}])
        else:
            msgs = rec["messages"]
            if (not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant"
                    or any(not isinstance(m.get("content"), str) for m in msgs)):
                raise CpiftError(f"{path}: record {i}: 'messages' must be role/content turns "
                                 f"ending with an assistant turn")
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        if rows is not None:
            rows.append(dict(rec))
    return out


@dataclass
class Encoded:
    """One tokenised example: ``labels`` is ``input_ids`` with the prompt set to -100."""

    input_ids: list[int]
    labels: list[int]


def _ids(out) -> list[int]:
    """apply_chat_template returns a list or (transformers 5) a mapping with input_ids."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise CpiftError(f"{where}: the tokenizer has no chat template (set 'chat_template' in "
                         f"tokenizer_config.json)")


def encode(tokenizer, messages: list[dict], max_length: int) -> Encoded | None:
    """Renders and tokenises one conversation; None when its prompt fills ``max_length``."""
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[:len(prompt)] != prompt:  # a template that renders the prompt differently alone
        n = 0
        while n < min(len(full), len(prompt)) and full[n] == prompt[n]:
            n += 1
        prompt = prompt[:n]
    if len(prompt) >= max_length:
        return None
    full = full[:max_length]
    return Encoded(full, [IGNORE] * len(prompt) + full[len(prompt):])


def encode_all(tokenizer, conversations: list[list[dict]], max_length: int,
               where: str) -> tuple[list[Encoded], int]:
    """Encodes every conversation; returns the examples and how many were dropped."""
    check_chat_template(tokenizer, where)
    out, dropped = [], 0
    for conv in conversations:
        e = encode(tokenizer, conv, max_length)
        if e is None:
            dropped += 1
        else:
            out.append(e)
    if not out:
        raise CpiftError(f"{where}: every example's prompt is longer than max_length="
                         f"{max_length}")
    return out, dropped
