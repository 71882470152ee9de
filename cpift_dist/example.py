"""The bundled small example: a tiny Llama and real short fine-tunes of it on synthetic tasks.

Until the full pipeline lands, ``cpift demo`` analyses these. The tasks are token-level
sequence transformations that pull the model in different directions (copy, reverse, sort,
shift); each fine-tune is a few dozen AdamW steps of plain PyTorch on CPU (seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cpift_dist.io import atomic_dir, read_manifest, write_manifest

TASKS = {
    "copy": lambda x: x,
    "reverse": lambda x: x.flip(-1),
    "sort": lambda x: x.sort(-1).values,
    "shift": lambda x: (x - 4 + 1) % 60 + 4,
}
_SEP, _VOCAB, _LEN = 2, 64, 12
SPEC = {"hidden": 64, "layers": 4, "steps": 60, "batch": 32, "lr": 3e-3, "seed": 0}


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=_VOCAB, hidden_size=SPEC["hidden"],
                      intermediate_size=2 * SPEC["hidden"], num_hidden_layers=SPEC["layers"],
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2 * _LEN + 2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def task_batch(task: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of ``n`` examples: prompt, separator, answer; loss on the answer."""
    x = torch.randint(4, 64, (n, _LEN), generator=gen)
    y = TASKS[task](x)
    ids = torch.cat([x, torch.full((n, 1), _SEP), y], dim=1)
    labels = ids.clone()
    labels[:, : _LEN + 1] = -100
    return ids, labels


def finetune(model, task: str, steps: int, seed: int, progress: bool = False):
    """Full fine-tune of ``model`` on one task with AdamW (in place); returns the final loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=SPEC["lr"], weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=f"fine-tune {task}", disable=not progress, leave=False):
        ids, labels = task_batch(task, SPEC["batch"], gen)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def ensure_example(root: str | Path, progress: bool = True) -> dict[str, Path]:
    """Builds (once) the base and one fine-tuned checkpoint per task under ``root``.

    Returns:
        ``{"base": dir, task: dir, ...}``. A complete build (its manifest matches ``SPEC``) is
        reused.
    """
    root = Path(root)
    out = {"base": root / "base", **{t: root / t for t in TASKS}}
    man = read_manifest(root)
    if man and man.get("config") == SPEC and all(p.is_dir() for p in out.values()):
        return out
    with atomic_dir(root, overwrite=True) as tmp:
        base = _model(SPEC["seed"])
        base.save_pretrained(tmp / "base", max_shard_size="200KB")
        losses = {}
        for i, task in enumerate(TASKS):
            model = _model(SPEC["seed"])  # identical to the base
            losses[task] = finetune(model, task, SPEC["steps"], seed=100 + i, progress=progress)
            model.save_pretrained(tmp / task, max_shard_size="200KB")
        (tmp / "losses.json").write_text(json.dumps(losses, indent=2))
        write_manifest(tmp, "example", SPEC, {}, outputs={})
    return out
