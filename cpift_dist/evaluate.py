"""Scoring models on held-out task splits: batched greedy generation, automatic scorers.

    scores = evaluate_model(model_dir, {"arithmetic": EvalTask(path, "alpaca", {}, "arithmetic")},
                            EvalConfig())

Each prompt is the example's conversation without its last (assistant) turn, rendered with the
model's chat template (generation prompt added); the response is what follows, up to
``max_new_tokens`` or the end-of-turn token. Scorers: the bundled suite's (by task), ``exact``
(the reference answer, whitespace-stripped) and ``contains``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cpift_dist.config import EvalConfig
from cpift_dist.data import load_records
from cpift_dist.data.suite import SCORERS
from cpift_dist.errors import CpiftError

# transformers 5's from_pretrained swaps process-wide state while it builds a model
# (PreTrainedModel.tie_weights with a no-op, torch's default dtype, torch.linspace) and puts
# back what it found on the way in. Two loads on threads at once interleave those swaps: the
# no-op can be what one of them puts back, and every later load in the process then leaves a
# tied lm_head out of the checkpoint newly initialised at random ("MISSING" in its report;
# 158 of 160 tiny tied loads on 4 threads, transformers 5.25; huggingface/transformers#44940
# is the fix's open PR). Eval threads load one model at a time; generation still overlaps.
_LOAD_LOCK = threading.Lock()


@dataclass
class EvalTask:
    """One task's held-out split and how to score it."""

    path: Path
    shape: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    scorer: str = "exact"


def score_response(scorer: str, response: str, reference: str, row: dict) -> float:
    if scorer == "exact":
        return float(response.strip() == reference.strip())
    if scorer == "contains":
        return float(reference.strip() in response)
    if scorer in SCORERS:
        return SCORERS[scorer](response, row)
    raise CpiftError(f"unknown scorer {scorer!r}")


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy responses to chat prompts, batched with left padding."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    stop = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(i, int) and i >= 0]
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False
                  ).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


def evaluate_model(model_dir: str | Path, tasks: dict[str, EvalTask], cfg: EvalConfig,
                   threads: int | None = None, device: str | None = None) -> dict[str, dict]:
    """Scores one model on every task; returns task -> {score, n, examples (first 3)}.

    Args:
        threads: torch's intra-op threads, set for the whole process (a Ray task's worker);
            leave it unset where other threads of the process run torch too.
        device: where the model runs (``cuda:1``, ``cpu``; ``auto``: spread over every GPU
            this process sees by accelerate's ``device_map``, for a model larger than one, the
            CPU holding what they do not; ``auto:2,3``: over those GPUs only); default the
            first GPU this process sees, else the CPU. bf16 on GPUs, float32 on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CpiftError(f"{model_dir}: no model to evaluate")
    with _LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise CpiftError(f"{model_dir}: the tokenizer has no chat template")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # a GPU it was given
    with _LOAD_LOCK:
        if device.startswith("auto"):
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=eval_dtype(device), device_map="auto",
                max_memory=_spread_memory(device)).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=eval_dtype(device))
    if not device.startswith("auto"):
        model = model.eval().to(device)  # the copy to a GPU outside the lock
    results = {}
    for name, t in tasks.items():
        rows: list[dict] = []
        convs = load_records(t.path, t.shape, t.columns or None, rows=rows)
        if cfg.limit:
            convs, rows = convs[:cfg.limit], rows[:cfg.limit]
        responses = generate(model, tok, [c[:-1] for c in convs], cfg.max_new_tokens,
                             cfg.batch_size)
        scores = [score_response(t.scorer, r, c[-1]["content"], row)
                  for r, c, row in zip(responses, convs, rows)]
        results[name] = {"score": sum(scores) / len(scores), "n": len(scores),
                         "examples": [{"prompt": c[-2]["content"], "reference": c[-1]["content"],
                                       "response": r} for c, r in zip(convs[:3], responses)]}
    return results


def _spread_memory(device: str) -> dict | None:
    """accelerate's ``max_memory`` for ``auto:2,3``: those GPUs' free memory, nothing on the
    others, and the host's available memory beyond them (accelerate uses only the devices
    named); None for ``auto`` (accelerate's default: every GPU, then the host)."""
    if ":" not in device:
        return None
    from cpift_dist.analysis.analyze import available_memory

    gpus = [int(i) for i in device.split(":", 1)[1].split(",")]
    return {**{i: torch.cuda.mem_get_info(i)[0] for i in gpus}, "cpu": available_memory()}


def eval_dtype(device: str) -> torch.dtype:
    """What a model is evaluated in: bf16 on GPUs, float32 on the CPU."""
    if device.startswith("auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def seesaw_table(scores: dict[str, dict[str, float]], single: dict[str, float],
                 tasks: list[str]) -> list[dict]:
    """Per method: per-task score, the average, and the worst drop against each task's own
    single-task model (max over tasks of single - method; negative: better everywhere)."""
    rows = []
    for method, s in scores.items():
        per = {t: s.get(t) for t in tasks}
        vals = [v for v in per.values() if v is not None]
        drops = [single[t] - per[t] for t in tasks if per[t] is not None and t in single]
        rows.append({"method": method, **per, "average": sum(vals) / len(vals) if vals else None,
                     "worst_drop": max(drops) if drops else None})
    return rows


def format_table(rows: list[dict], tasks: list[str]) -> str:
    """The seesaw table as GitHub markdown."""
    head = "| method | " + " | ".join(tasks) + " | average | worst drop vs single-task |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for r in rows:
        cells = [f"{r[t]:.3f}" if r[t] is not None else "-" for t in tasks]
        avg = f"{r['average']:.3f}" if r["average"] is not None else "-"
        drop = f"{r['worst_drop']:+.3f}" if r["worst_drop"] is not None else "-"
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {avg} | {drop} |")
    return "\n".join(lines)
