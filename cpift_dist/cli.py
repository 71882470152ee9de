"""The ``cpift`` command line.

    cpift analyze --base DIR --tuned NAME=DIR [--tuned NAME=DIR ...] --p 0.01 --out OUT
    cpift analyze --config configs/analyze-example.yaml [analysis.p=0.02 ...]
    cpift demo [--runs-dir runs]

Every error on bad input is one line naming the culprit; the exit status is 2 and no partial
output is left behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpift_dist.errors import CpiftError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpift", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="core masks, stats and overlap of fine-tuned models")
    a.add_argument("--config", type=Path, help="run config YAML (base, tasks, analysis, ray)")
    a.add_argument("--base", type=Path, help="base checkpoint directory")
    a.add_argument("--tuned", action="append", default=[], metavar="NAME=DIR",
                   help="a task's fine-tuned checkpoint (repeat per task, in task order)")
    a.add_argument("--p", type=float, help="share of parameters in each core region (0.01)")
    a.add_argument("--selection", choices=["global", "per-tensor", "per-layer"],
                   help="top-k over the whole model (default), per tensor or per layer")
    a.add_argument("--out", type=Path, help="output directory (default <runs>/<name>/analysis)")
    _add_exec_args(a)
    a.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. analysis.chunk_elements=1048576")

    d = sub.add_parser("demo", help="the embedded default: bundled example analysed on local Ray")
    d.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where runs/demo goes")
    _add_exec_args(d)
    return p


def _add_exec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray")
    p.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _analyze_config(args) -> tuple:
    from cpift_dist.config import apply_overrides, read_yaml, validate, RunConfig

    source = str(args.config) if args.config else "command line"
    data = read_yaml(args.config) if args.config else {}
    if args.base:
        data["base"] = str(args.base)
    if args.tuned:
        tasks = []
        for item in args.tuned:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise CpiftError(f"--tuned {item!r}: expected NAME=DIR")
            tasks.append({"name": name, "tuned": path})
        data["tasks"] = tasks
    for key, val in (("p", args.p), ("selection", args.selection)):
        if val is not None:
            data.setdefault("analysis", {})[key] = val
    _exec_overrides(data, args)
    apply_overrides(data, args.overrides, source)
    cfg = validate(RunConfig, data, source)
    missing = [t.name for t in cfg.tasks if t.tuned is None]
    if missing:
        raise CpiftError(f"{source}: task {missing[0]!r} has no tuned checkpoint")
    out = args.out or cfg.run_dir / "analysis"
    return cfg, out


def _exec_overrides(data: dict, args) -> None:
    ray = data.setdefault("ray", {})
    if args.address:
        ray["address"] = args.address
    if args.num_cpus:
        ray["num_cpus"] = args.num_cpus
    if args.no_ray:
        ray["enabled"] = False


def make_executor(ray_cfg):
    """The executor a run config asks for (starting or joining Ray when enabled)."""
    import os

    from cpift_dist.executor import InProcessExecutor, RayExecutor
    from cpift_dist.ray_utils import init_ray

    if not ray_cfg.enabled:
        return InProcessExecutor(threads=ray_cfg.num_cpus or os.cpu_count() or 1)
    init_ray(ray_cfg.address or os.environ.get("RAY_ADDRESS"), ray_cfg.num_cpus)
    return RayExecutor()


def cmd_analyze(args) -> int:
    from rich.console import Console

    from cpift_dist.analysis import analyze
    from cpift_dist.analysis.stats import summary_table

    cfg, out = _analyze_config(args)
    executor = make_executor(cfg.ray)
    res = analyze(cfg.base, {t.name: t.tuned for t in cfg.tasks}, out, cfg.analysis,
                  executor=executor, overwrite=args.overwrite, progress=not args.quiet)
    console = Console()
    console.print(summary_table(res.stats, res.overlap))
    console.print(f"wrote {out}/masks/*.safetensors, stats.json, overlap.json, manifest.json")
    return 0


def cmd_demo(args) -> int:
    from rich.console import Console

    from cpift_dist.analysis import analyze
    from cpift_dist.analysis.stats import summary_table
    from cpift_dist.config import AnalysisConfig, RayConfig
    from cpift_dist.example import ensure_example

    console = Console()
    run = args.runs_dir / "demo"
    console.print(f"[bold]cpift demo[/bold]: bundled example in {run}/models")
    models = ensure_example(run / "models", progress=not args.quiet)
    data: dict = {}
    _exec_overrides(data, args)
    executor = make_executor(RayConfig(**data["ray"]))
    console.print(f"delta analysis on {executor.name} (p=0.01, global top-k)")
    res = analyze(models["base"], {t: p for t, p in models.items() if t != "base"},
                  run / "analysis",
                  AnalysisConfig(p=0.01, chunk_elements=8192, unit_elements=32768), executor=executor,
                  overwrite=True, progress=not args.quiet)
    console.print(summary_table(res.stats, res.overlap))
    console.print(f"wrote {run}/analysis")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"analyze": cmd_analyze, "demo": cmd_demo}[args.command](args)
    except CpiftError as e:
        print(f"cpift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpift: interrupted (no partial output was kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
