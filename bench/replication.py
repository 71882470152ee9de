"""Mini replication of CPI-FT's claims on the bundled suite, through `cpift run`.

    .venv/bin/python bench/replication.py [--seeds 0,1,2] [--base builtin:smollm2-135m-instruct]
        [--ft-steps 8] [--sft-steps 16] [--limit 16] [--pair arithmetic,logic]

1. Seesaw table, mean and standard deviation over seeds: CPI-FT against multi-task SFT,
   multi-stage SFT (random split, heuristic split), evolving isolation alone (``epi``: one
   stage on all tasks from the base) and CPI-FT with evolving masks in its stages (``cpi +
   epi``, a run of its own per seed), the same loop and the same total budget
   (``--sft-steps`` optimizer steps), the single-task fine-tunes as per-task references. The
   single-task fine-tunes, the analysis and the fusion are shared by the seeds (seed 0's); a
   seed changes the SFT's data order and initial mix, the random split and the stage order.
2. Forgetting (the paper's Table 2, in this project's terms): task A then task B.
   multi-stage = A then B from the base, no isolation; CPI-FT = A then B from the fused
   backbone with A's core frozen in stage 2; full SFT = A and B mixed in one stage. Printed:
   the change on A from after-A to after-B (forgetting) and on B, per method.

Everything lands in ``--out`` (default ``bench/_data/replication``); a rerun resumes. The
figures go to ``replication.md`` there and to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ["cpi", "multitask", "multistage-random", "multistage-heuristic", "epi"]
EPI = {"p": 0.01, "refresh_every": 2, "warmup_steps": 1}  # sft.epi of epi and of cpi + epi


def _cfg(args, name: str, seed: int, tasks: list[str], tuned_from: Path | None, **extra):
    from cpift_dist.config import EPIConfig, load_config

    cfg = load_config(ROOT / "cpift_dist" / "presets" / "default.yaml", [
        f"name={name}", f"runs_dir={args.out}", f"base={args.base}",
        f"train.max_steps={args.ft_steps}", f"sft.steps={args.sft_steps}",
        f"eval.limit={args.limit}", "train.progress=false", f"sft.seed={seed}",
        f"grouping.seed={seed}"])
    cfg.tasks = [t for t in cfg.tasks if t.name in tasks]
    if tuned_from is not None:
        cfg.tasks = [t.model_copy(update={"tuned": tuned_from / "finetune" / t.name / "model"})
                     for t in cfg.tasks]
    cfg.sft.train = cfg.train.model_copy(update={"seed": seed})
    cfg.baselines = [m for m in METHODS if m != "cpi"]
    cfg.sft.epi = EPIConfig(**EPI)
    for k, v in extra.items():
        section, _, field = k.partition("__")
        if field:
            setattr(getattr(cfg, section), field, v)
        else:
            setattr(cfg, section, v)
    return cfg


def _run(cfg) -> dict:
    from cpift_dist.pipeline import Pipeline

    Pipeline(cfg, progress=False, log=lambda s: print(f"  [{cfg.name}] {s}", flush=True)).run()
    return json.loads((cfg.run_dir / "eval" / "scores.json").read_text())["scores"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--base", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--ft-steps", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=16)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--pair", default="arithmetic,logic")
    ap.add_argument("--out", type=Path, default=HERE / "_data" / "replication")
    ap.add_argument("--tuned-from", type=Path,
                    help="a finished run whose finetune/<task>/model to reuse (same base)")
    ap.add_argument("--table-only", action="store_true",
                    help="print the seesaw table of the seeds in replication-seeds.json; run nothing")
    args = ap.parse_args()
    args.out = args.out.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = ["arithmetic", "strings", "logic", "format"]

    from cpift_dist.config import EPIConfig
    from cpift_dist.ray_utils import init_ray

    per_seed, first = {}, (args.tuned_from.resolve() if args.tuned_from else None)
    if args.table_only:
        saved = json.loads((args.out / "replication-seeds.json").read_text())
        per_seed = {int(k): v for k, v in saved.items() if int(k) in seeds}
        seeds = sorted(per_seed)
        print("\n".join(_seesaw(args, seeds, tasks, per_seed)))
        return
    init_ray(None)
    for seed in seeds:
        cfg = _cfg(args, f"seesaw-s{seed}", seed, tasks, first)
        cfg.sft.epi = EPIConfig(**EPI, cpi_stages=False)  # the epi baseline; CPI-FT plain
        per_seed[seed] = _run(cfg)
        first = first or cfg.run_dir
        both = _cfg(args, f"seesaw-s{seed}-cpi-epi", seed, tasks, first, baselines=[])
        per_seed[seed]["cpi+epi"] = _final(_run(both), "cpi")
        (args.out / "replication-seeds.json").write_text(json.dumps(per_seed, indent=1))
    lines = _seesaw(args, seeds, tasks, per_seed)
    a, b = args.pair.split(",")
    cfg = _cfg(args, f"forgetting-{a}-{b}", 0, [a, b], first,
               grouping__tau=1.0, grouping__order="task-order", sft__num_stages=2,
               eval__every_stage=True)
    cfg.tasks = sorted(cfg.tasks, key=lambda t: [a, b].index(t.name))
    cfg.baselines = ["multitask", "multistage-heuristic"]
    sc = _run(cfg)
    lines += ["", f"## Forgetting: {a} (A) then {b} (B), seed 0", "",
              "| method | A after A | A after B | change on A | B after A | B after B | "
              "change on B |", "|---|---|---|---|---|---|---|"]
    for label, s1, s2 in (("multi-stage (no isolation)", sc["multistage-heuristic:stage-1"],
                           sc["multistage-heuristic"]),
                          ("CPI-FT (A's core frozen)", sc["cpi:stage-1"], sc["cpi:stage-2"])):
        lines.append(f"| {label} | {s1[a]:.3f} | {s2[a]:.3f} | {s2[a] - s1[a]:+.3f} | "
                     f"{s1[b]:.3f} | {s2[b]:.3f} | {s2[b] - s1[b]:+.3f} |")
    full = sc["multitask"]
    lines.append(f"| full SFT (A+B mixed; vs base) | - | {full[a]:.3f} | "
                 f"{full[a] - sc['base'][a]:+.3f} | - | {full[b]:.3f} | "
                 f"{full[b] - sc['base'][b]:+.3f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "replication.md").write_text(text)
    print("\n" + text)


def _seesaw(args, seeds: list[int], tasks: list[str], per_seed: dict) -> list[str]:
    rows = {"single-task": {t: [per_seed[s][f"single:{t}"][t] for s in seeds] for t in tasks},
            "base": {t: [per_seed[s]["base"][t] for s in seeds] for t in tasks},
            "fused backbone": {t: [per_seed[s]["fused"][t] for s in seeds] for t in tasks}}
    for m in METHODS + ["cpi+epi"]:
        if not all(m in per_seed[s] or any(k.startswith(f"{m}:") for k in per_seed[s])
                   for s in seeds):
            continue  # scores saved before the method existed
        label = {"cpi": "CPI-FT", "epi": "EPI (one stage)",
                 "cpi+epi": "CPI-FT + EPI"}.get(m, m)
        rows[label] = {t: [_final(per_seed[s], m)[t] for s in seeds] for t in tasks}
    lines = [f"## Seesaw table: mean +- std over seeds {seeds} (base {args.base}, "
             f"fine-tunes {'from ' + str(args.tuned_from) if args.tuned_from else str(args.ft_steps) + ' steps'}, SFT budget {args.sft_steps} steps, "
             f"{args.limit} held-out examples per task)", "",
             "| method | " + " | ".join(tasks) + " | average | worst drop vs single-task |",
             "|" + "---|" * (len(tasks) + 3)]
    for label, per in rows.items():
        avg = [statistics.mean(per[t][i] for t in tasks) for i in range(len(seeds))]
        drop = [max(rows["single-task"][t][i] - per[t][i] for t in tasks)
                for i in range(len(seeds))]
        lines.append(f"| {label} | " + " | ".join(_ms(per[t]) for t in tasks)
                     + f" | {_ms(avg)} | {_ms(drop, sign=True)} |")

    return lines


def _final(scores: dict, method: str) -> dict:
    if method in scores:
        return scores[method]
    stages = sorted((k for k in scores if k.startswith(f"{method}:stage-")),
                    key=lambda k: int(k.rsplit("-", 1)[1]))
    return scores[stages[-1]]


def _ms(values: list[float], sign: bool = False) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:+.3f} +- {s:.3f}" if sign else f"{m:.3f} +- {s:.3f}"


if __name__ == "__main__":
    sys.exit(main())
