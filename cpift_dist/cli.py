"""The ``cpift`` command line.

    cpift analyze --base DIR --tuned NAME=DIR [--tuned NAME=DIR ...] --p 0.01 --out OUT
    cpift analyze --config configs/analyze-example.yaml [analysis.p=0.02 ...]
    cpift group --analysis OUT --tau 0.1 [--order random|core-size|task-order] [--seed S] --out groups.json
    cpift fuse --base DIR --tuned NAME=DIR ... --masks OUT/masks --out DIR [--omega uniform|FLOAT]
               [--space weights|task-vectors] [--overlap max-magnitude|task-order]
               [--granularity tensor|row] [--device auto|cpu|cuda] [--widened-dtype float32|base]
    cpift finetune --config cfg.yaml [--task NAME ...] [--address RAY_ADDRESS]
    cpift sft --config cfg.yaml [--method cpi|multitask|multistage-random|multistage-heuristic|epi]
              [--address RAY_ADDRESS] [--no-ray] [--plan] [--prepare-stage K]
    cpift run [CONFIG.yaml] [--preset default|tiny] [--address RAY_ADDRESS] [--from STAGE]
              [key=value ...]
    cpift verify DIR [DIR ...]      (exit 1 when a file differs from its manifest)
    cpift data make-suite --out DIR [--seed S] [--n-train N] [--n-eval N]

Every error on bad input is one line naming the culprit; the exit status is 2 and no partial
output is left behind. Ctrl-C exits 130, SIGTERM 143 (:func:`sigterm_stops`), after the same
clean-up.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import signal
import sys
import threading
from pathlib import Path

from cpift_dist.errors import CpiftError, Terminated
from cpift_dist.ray_utils import keep_local_logs, local_ray_uses


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpift", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="core masks, stats and overlap of fine-tuned models")
    a.add_argument("--config", type=Path, help="run config YAML (base, tasks, analysis, ray)")
    a.add_argument("--base", type=Path, help="base checkpoint directory")
    a.add_argument("--tuned", action="append", default=[], metavar="NAME=DIR",
                   help="a task's fine-tuned checkpoint (repeat per task, in task order)")
    a.add_argument("--p", dest="analysis_p", type=float,
                   help="share of parameters in each core region (0.01)")
    a.add_argument("--selection", dest="analysis_selection",
                   choices=["global", "per-tensor", "per-layer"],
                   help="top-k over the whole model (default), per tensor or per layer")
    a.add_argument("--out", type=Path, help="output directory (default <runs>/<name>/analysis)")
    _add_exec_args(a)
    a.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. analysis.chunk_elements=1048576")

    g = sub.add_parser("group", help="group tasks into SFT stages by core-region overlap")
    g.add_argument("--analysis", type=Path, required=True, help="a cpift analyze output directory")
    g.add_argument("--tau", type=float, default=0.1, help="link tasks with Jaccard >= tau (0.1)")
    g.add_argument("--order", default="random", help="random | core-size | task-order")
    g.add_argument("--seed", type=int, default=0, help="seed of the random order")
    g.add_argument("--out", type=Path, help="groups.json path (default beside the analysis)")

    f = sub.add_parser("fuse", help="fuse one backbone: core transplant + SLERP of the rest")
    f.add_argument("--config", type=Path, help="run config YAML (base, tasks, fusion, ray)")
    f.add_argument("--base", type=Path, help="base checkpoint directory")
    f.add_argument("--tuned", action="append", default=[], metavar="NAME=DIR",
                   help="a task's fine-tuned checkpoint (repeat, in task order)")
    f.add_argument("--masks", type=Path, required=True, help="directory of <task>.safetensors masks")
    f.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    for flag, field in (("--omega", "omega"), ("--space", "space"), ("--overlap", "overlap"),
                        ("--granularity", "granularity"), ("--device", "device"),
                        ("--backend", "backend"), ("--max-shard-size", "max_shard_bytes"),
                        ("--widened-dtype", "widened_dtype")):
        f.add_argument(flag, dest=f"fusion_{field}", help=f"fusion.{field}")
    _add_exec_args(f)
    f.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    ft = sub.add_parser("finetune", help="one DeepSpeed fine-tune per task, scheduled by Ray")
    ft.add_argument("--config", type=Path, required=True, help="run config YAML")
    ft.add_argument("--task", action="append", default=[], help="only these tasks (repeat)")
    _add_exec_args(ft)
    ft.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    r = sub.add_parser("run", help="the whole pipeline: finetune, analyze, group, fuse, sft, "
                                   "baselines, eval, report (resumable)")
    r.add_argument("config", nargs="?", type=Path, help="run config YAML (default: --preset)")
    r.add_argument("--preset", choices=["default", "tiny"],
                   help="a shipped config: default (SmolLM2-135M + suite) or tiny")
    r.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="restart from this stage (its outputs and later ones are redone)")
    _add_exec_args(r)
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    sf = sub.add_parser("sft", help="the final SFT: CPI-FT masked stages or a baseline")
    sf.add_argument("--config", type=Path, required=True, help="run config YAML")
    sf.add_argument("--method", choices=["cpi", "multitask", "multistage-random",
                                         "multistage-heuristic", "epi"],
                    help="SFT method (default: the config's sft.method)")
    sf.add_argument("--plan", action="store_true", help="print the stage plan as JSON and exit")
    sf.add_argument("--prepare-stage", type=int, metavar="K",
                    help="ready stage K's directory and exit (before a launcher runs it)")
    _add_exec_args(sf)
    sf.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    v = sub.add_parser("verify", help="re-hash stages' outputs against their manifests")
    v.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                   help="a stage directory holding a manifest.json (a checkpoint, an "
                        "analysis), or a tree of them (a whole run: every stage below)")

    dp = sub.add_parser("data", help="task data tools")
    dsub = dp.add_subparsers(dest="data_command", required=True)
    ms = dsub.add_parser("make-suite", help="write the bundled, generated task suite")
    ms.add_argument("--out", type=Path, required=True, help="output directory")
    ms.add_argument("--seed", type=int, default=0, help="generation seed")
    ms.add_argument("--n-train", type=int, default=512, help="training examples per task")
    ms.add_argument("--n-eval", type=int, default=64, help="held-out examples per task")
    ms.add_argument("--overwrite", action="store_true", help="replace an existing suite")

    return p


def _add_exec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray")
    p.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_config(args, section: str):
    """The run config from --config, the common flags and ``fusion_*``-style section flags."""
    from cpift_dist.config import RunConfig, apply_overrides, read_yaml, validate

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
    for key, val in vars(args).items():
        if key.startswith(f"{section}_") and val is not None:
            data.setdefault(section, {})[key[len(section) + 1:]] = val
    _exec_overrides(data, args)
    apply_overrides(data, args.overrides, source)
    cfg = validate(RunConfig, data, source)
    missing = [t.name for t in cfg.tasks if t.tuned is None]
    if missing:
        raise CpiftError(f"{source}: task {missing[0]!r} has no tuned checkpoint")
    return cfg


def _exec_overrides(data: dict, args) -> None:
    ray = data.setdefault("ray", {})
    if args.address:
        ray["address"] = args.address
    if args.num_cpus:
        ray["num_cpus"] = args.num_cpus
    if args.no_ray:
        ray["enabled"] = False


def cmd_analyze(args) -> int:
    from rich.console import Console

    from cpift_dist.analysis import analyze
    from cpift_dist.analysis.stats import summary_table
    from cpift_dist.executor import make_executor

    cfg = _run_config(args, "analysis")
    out = args.out or cfg.run_dir / "analysis"
    executor = make_executor(cfg.ray)
    res = analyze(cfg.base, {t.name: t.tuned for t in cfg.tasks}, out, cfg.analysis,
                  executor=executor, overwrite=args.overwrite, progress=not args.quiet)
    console = Console()
    console.print(summary_table(res.stats, res.overlap))
    console.print(f"wrote {out}/masks/*.safetensors, stats.json, overlap.json, manifest.json")
    return 0


def cmd_group(args) -> int:
    from rich.console import Console

    from cpift_dist.config import GroupingConfig, validate
    from cpift_dist.grouping import group

    cfg = validate(GroupingConfig, {"tau": args.tau, "order": args.order, "seed": args.seed},
                   "command line")
    out = args.out or args.analysis.parent / "groups.json"
    res = group(args.analysis, cfg, out)
    console = Console()
    for st in res["stages"]:
        console.print(f"stage {st['stage']}: {', '.join(st['tasks'])} "
                      f"(core union {st['core_union']:,})")
    console.print(f"wrote {out}, {out.with_suffix('.jaccard.png').name}, "
                  f"{out.with_suffix('.core-location.png').name}")
    return 0


def cmd_fuse(args) -> int:
    from rich.console import Console

    from cpift_dist.executor import make_executor
    from cpift_dist.fusion import fuse

    cfg = _run_config(args, "fusion")
    executor = make_executor(cfg.ray, num_gpus=1 if cfg.fusion.device == "cuda" else 0)
    man = fuse(cfg.base, {t.name: t.tuned for t in cfg.tasks}, args.masks, args.out, cfg.fusion,
               executor=executor, overwrite=args.overwrite, progress=not args.quiet)
    Console().print(
        f"fused {len(man['tasks'])} tasks ({man['backend']} on {man['device']}): "
        f"{man['core_elements']:,} core elements transplanted, {man['overlap_elements']:,} in "
        f"several cores (resolved by {cfg.fusion.overlap}); wrote {args.out}" + (
            f" ({man['resumed_shards']} of the shards kept from an interrupted run)"
            if man["resumed_shards"] else ""))
    return 0


def cmd_finetune(args) -> int:
    import os

    from cpift_dist.config import load_config
    from cpift_dist.ray_utils import init_ray, resolve_use_gpu
    from cpift_dist.training import SFTJob
    from cpift_dist.training.ray_finetune import finetune_all

    cfg = load_config(args.config, args.overrides)
    tasks = [t for t in cfg.tasks if not args.task or t.name in args.task]
    unknown = sorted(set(args.task) - {t.name for t in cfg.tasks})
    if unknown:
        raise CpiftError(f"{args.config}: no task named {unknown[0]!r}")
    missing = [t.name for t in tasks if t.train_data is None]
    if missing:
        raise CpiftError(f"{args.config}: task {missing[0]!r} has no train_data")
    for t in tasks:
        if not t.train_data.is_file():
            raise CpiftError(f"{t.train_data}: task data file of {t.name!r} does not exist")
    init_ray(args.address or cfg.ray.address or os.environ.get("RAY_ADDRESS"),
             args.num_cpus or cfg.ray.num_cpus)
    jobs = {t.name: SFTJob(cfg.base, {t.name: t.train_data}, cfg.run_dir / "finetune" / t.name,
                           cfg.train, {t.name: (t.data_shape, t.columns)}) for t in tasks}
    fc = cfg.finetune
    finetune_all(jobs, fc.workers_per_task, fc.max_failures,
                 use_gpu=resolve_use_gpu(fc.use_gpu, fc.workers_per_task),
                 placement=fc.placement)
    for t, j in jobs.items():
        print(f"{t}: {j.out / 'model'}")
    return 0


def preset_path(name: str) -> Path:
    return Path(__file__).parent / "presets" / f"{name}.yaml"


def cmd_run(args) -> int:
    from rich.console import Console

    from cpift_dist.config import load_config
    from cpift_dist.pipeline import Pipeline

    if args.config and "=" in str(args.config) and not args.config.exists():
        args.overrides.insert(0, str(args.config))  # `cpift run --preset tiny key=value`
        args.config = None
    if args.config and args.preset:
        raise CpiftError("give a config file or --preset, not both")
    path = args.config or preset_path(args.preset or "default")
    data: dict = {}
    _exec_overrides(data, args)
    cfg = load_config(path, [*args.overrides, *(f"ray.{k}={v}" for k, v in data["ray"].items())])
    console = Console(soft_wrap=True)
    console.print(f"[bold]cpift run[/bold] {path} -> {cfg.run_dir}")
    res = Pipeline(cfg, args.from_stage, progress=not args.quiet, log=console.print).run()
    console.print(res["table"])
    console.print(f"report: {res['path']} and {res['html']}")
    return 0


def cmd_sft(args) -> int:
    import json

    from rich.console import Console

    from cpift_dist.config import load_config
    from cpift_dist.training.sft import describe, plan_stages, prepare_stage, run_stage

    data: dict = {}
    _exec_overrides(data, args)
    overrides = [f"ray.{k}={v}" for k, v in data["ray"].items()]
    cfg = load_config(args.config, [*args.overrides, *overrides])
    stages = plan_stages(cfg, args.method)
    if args.plan:
        print(json.dumps(describe(stages), indent=2))
        return 0
    if args.prepare_stage is not None:
        if not 1 <= args.prepare_stage <= len(stages):
            raise CpiftError(f"--prepare-stage must be 1..{len(stages)}")
        prepare_stage(cfg, stages[args.prepare_stage - 1])
        return 0
    console = Console(soft_wrap=True)
    for st in stages:
        frozen = f", {', '.join(st.frozen_tasks)} frozen" if st.frozen_tasks else ""
        console.print(f"stage {st.index}/{len(stages)} ({st.method}): {', '.join(st.tasks)}; "
                      f"{st.steps} steps from {st.init}{frozen}")
        man = run_stage(cfg, st, progress=not args.quiet)
        if "frozen_elements" in man:
            console.print(f"  {man['frozen_elements']:,} frozen elements checked bit for bit")
    console.print(f"final model: {stages[-1].out / 'model'}")
    return 0


def cmd_verify(args) -> int:
    from cpift_dist.io import read_manifest, verify_outputs
    from cpift_dist.io.manifest import MANIFEST_NAME

    stages = []
    for d in args.dirs:  # a stage directory, or a tree of them (a whole run)
        if (d / MANIFEST_NAME).is_file():
            stages.append(d)
            continue
        found = sorted(m.parent for m in d.rglob(MANIFEST_NAME)) if d.is_dir() else []
        if not found:
            raise CpiftError(f"{d}: no {MANIFEST_NAME} there or below")
        stages += found
    bad = 0
    for d in stages:
        problems = verify_outputs(d)
        for line in problems:
            print(f"cpift: {line}", file=sys.stderr)
        if problems:
            bad += 1
        else:
            print(f"{d}: {len(read_manifest(d)['outputs'])} files match the manifest")
    if len(stages) > 1:
        print(f"{len(stages) - bad} of {len(stages)} stage directories match their manifests")
    return 1 if bad else 0


def cmd_data(args) -> int:
    from cpift_dist.data import make_suite

    if args.n_train < 1 or args.n_eval < 1:
        raise CpiftError("--n-train and --n-eval must be at least 1")
    meta = make_suite(args.out, args.n_train, args.n_eval, args.seed, overwrite=args.overwrite)
    for task, m in meta["tasks"].items():
        print(f"{task:12s} {m['shape']:9s} train {m['train']:5d}  eval {m['eval']:4d}")
    print(f"wrote {args.out}/<task>/{{train,eval}}.jsonl and suite.json (seed {args.seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options too (`cpift run CFG --no-ray --quiet a.b=1`)
    if extra and hasattr(args, "overrides") and all(
            "=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    rc = 1  # an exception other than those below propagates
    uses = local_ray_uses()
    _trace_crashes()
    try:
        with sigterm_stops():
            rc = {"analyze": cmd_analyze, "group": cmd_group, "fuse": cmd_fuse,
                  "finetune": cmd_finetune, "sft": cmd_sft, "run": cmd_run,
                  "verify": cmd_verify, "data": cmd_data}[args.command](args)
    except CpiftError as e:
        print(f"cpift: error: {e}", file=sys.stderr)
        _notes(e)
        rc = 2
    except KeyboardInterrupt as e:
        kept = getattr(e, "__notes__", None)
        term = isinstance(e, Terminated)
        print(("cpift: stopped by SIGTERM" if term else "cpift: interrupted") +
              ("" if kept else " (no partial output was kept)"), file=sys.stderr)
        _notes(e)
        rc = 128 + signal.SIGTERM if term else 130
    finally:
        if rc != 0 and local_ray_uses() > uses and (logs := keep_local_logs()) is not None:
            print(f"cpift: the local Ray's logs are kept in {logs}", file=sys.stderr)
    return rc


def _trace_crashes() -> None:
    """On a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) print every thread's
    Python stack to stderr before the process dies as it would have (the handler chains to the
    default one, so the exit status is still -11 and the like). A crash in native code (torch,
    numba, a BLAS) otherwise leaves no clue of where it happened."""
    if not faulthandler.is_enabled():
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stderr
            faulthandler.enable(file=sys.stderr, all_threads=True)


@contextlib.contextmanager
def sigterm_stops():
    """Within it, SIGTERM raises :class:`~cpift_dist.errors.Terminated` (a KeyboardInterrupt)
    in the main thread, so that it stops ``cpift`` as Ctrl-C does: temporary outputs removed, a
    fuse's finished shards kept for the same command to resume, the launcher's jobs stopped.
    Python's default would end the process at once, with none of that. A second SIGTERM ends
    it at once. SIGUSR1, which ends a Python process by default, does nothing to ``cpift``
    (the training ranks it starts save a checkpoint and stop on it:
    :data:`cpift_dist.training.loop.STOP_SIGNALS`). Nothing changes where SIGTERM already has
    a handler (an embedding program's) or outside the main thread."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    usr1 = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGTERM, stop)
    if usr1 is signal.SIG_DFL:  # SLURM's --signal=USR1@T is for the training ranks (a
        signal.signal(signal.SIGUSR1, lambda *_: None)  # checkpoint, then stop), not a kill
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, usr1)


def _notes(e: BaseException) -> None:
    """What an error's notes add (a resumable output kept, and where)."""
    for n in getattr(e, "__notes__", []):
        print(f"cpift: {n}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
