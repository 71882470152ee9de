"""The run report: ``report/report.md`` and a self-contained ``report/report.html``.

Sections: the seesaw table (per-task score of every method, the average, the worst drop
against each task's single-task model, and how many held-out examples each score rests on),
the stages, the frozen-element check of every SFT stage (counts from three sources, verdict),
per-task scores per method (bar plot), the Jaccard heatmap with the groups (colours scaled to
the off-diagonal range), the core-region share per layer and per module type, training
loss curves per SFT stage and baseline, and with evolving isolation its refreshes and the
isolation drift (Jaccard of consecutive masks, the frozen set's share per layer over time).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cpift_dist.evaluate import format_table, seesaw_table  # noqa: E402
from cpift_dist.io import atomic_dir  # noqa: E402


def _methods(scores: dict, tasks: list[str], sft_method: str) -> tuple[dict, dict]:
    """(method -> task scores, task -> its single-task model's score)."""
    single = {t: scores[f"single:{t}"][t] for t in tasks if f"single:{t}" in scores}
    rows = {}
    if "base" in scores:
        rows["base"] = scores["base"]
    if single:
        rows["single-task (own model)"] = single
    if "fused" in scores:
        rows["fused backbone"] = scores["fused"]
    stages = sorted((k for k in scores if k.startswith(f"{sft_method}:stage-")),
                    key=lambda k: int(k.rsplit("-", 1)[1]))
    for k in stages:
        rows[k] = scores[k]
    if stages:
        rows[f"{sft_method} (final)"] = scores[stages[-1]]
    for k, v in scores.items():
        if k.split(":")[0] not in ("base", "fused", "single", sft_method):
            rows[k] = v
    return rows, single


def _plot_scores(rows: dict, tasks: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    n = len(rows)
    width = 0.8 / max(1, n)
    for i, (m, s) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(tasks))], [s.get(t) or 0 for t in tasks],
               width, label=m)
    ax.set_xticks([j + (n - 1) * width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("per-task scores per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_core_share(stats: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "per_layer", "core share per layer"),
                           (axes[1], "per_module", "core share per module type")):
        names = sorted({k for s in stats.values() for k in s.get(key, {})},
                       key=lambda k: (len(k), k))
        width = 0.8 / max(1, len(stats))
        for i, (task, s) in enumerate(stats.items()):
            vals = [s.get(key, {}).get(k, {}).get("share_of_core", 0) for k in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=task)
        ax.set_xticks([j + (len(stats) - 1) * width / 2 for j in range(len(names))], names,
                      rotation=60, fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("share of the task's core region")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_losses(run_dir: Path, path: Path) -> bool:
    curves = {}
    for metrics in sorted(run_dir.glob("sft/stage-*/metrics.jsonl")) + sorted(
            run_dir.glob("baselines/*/stage-*/metrics.jsonl")):
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        label = str(metrics.parent.relative_to(run_dir))
        curves[label] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = {}
    for label, (steps, losses) in curves.items():  # stages of one method follow each other
        method = label.rsplit("/", 1)[0]
        start = offset.get(method, 0)
        ax.plot([s + start for s in steps], losses, marker=".", label=label)
        offset[method] = start + (steps[-1] if steps else 0)
    ax.set_xlabel("optimizer step (stages of a method in sequence)")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.set_title("training loss per SFT stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def epi_logs(run_dir: Path) -> dict[str, dict]:
    """Stage directory (relative) -> its evolving-isolation log (``epi/epi.json``)."""
    out = {}
    for f in sorted(run_dir.glob("sft/stage-*/epi/epi.json")) + sorted(
            run_dir.glob("baselines/*/stage-*/epi/epi.json")):
        try:
            out[str(f.parent.parent.relative_to(run_dir))] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    return out


def _plot_drift(logs: dict[str, dict], path: Path) -> bool:
    """Isolation drift: Jaccard of consecutive masks, and the frozen set's share per layer."""
    logs = {k: v for k, v in logs.items() if v.get("refreshes")}
    if not logs:
        return False
    fig, axes = plt.subplots(len(logs), 2, figsize=(11, 3.2 * len(logs)), squeeze=False)
    for (stage, log), (ax_j, ax_l) in zip(logs.items(), axes):
        recs = log["refreshes"]
        pairs = [(r["step"], r["jaccard_prev"]) for r in recs if "jaccard_prev" in r]
        if pairs:
            ax_j.plot(*zip(*pairs), marker="o")
        ax_j.set_ylim(0, 1.02)
        ax_j.set_xlabel("refresh step")
        ax_j.set_ylabel("Jaccard with the previous mask")
        ax_j.set_title(f"{stage}: mask drift ({len(recs)} refreshes)")
        layers = log.get("layers") or sorted({g for r in recs for g in r.get("layer_share", {})})
        grid = [[r.get("layer_share", {}).get(g, 0.0) for r in recs] for g in layers]
        im = ax_l.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax_l.set_yticks(range(len(layers)), layers, fontsize=7)
        ax_l.set_xticks(range(len(recs)), [r["step"] for r in recs], fontsize=7)
        ax_l.set_xlabel("refresh step")
        ax_l.set_title("share of the frozen set per layer")
        fig.colorbar(im, ax=ax_l, label="share of the frozen set")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _epi_markdown(logs: dict[str, dict]) -> str:
    rows = ["| stage | p | refresh every | refreshes | frozen per refresh | Jaccard with the "
            "previous (min / last) |", "|---|---|---|---|---|---|"]
    for stage, log in logs.items():
        recs, c = log.get("refreshes", []), log.get("config", {})
        jac = [r["jaccard_prev"] for r in recs if "jaccard_prev" in r]
        frozen = f"{recs[-1]['selected']:,}" if recs else "-"
        drift = f"{min(jac):.3f} / {jac[-1]:.3f}" if jac else "-"
        rows.append(f"| {stage} | {c.get('p')} | {c.get('refresh_every')} | {len(recs)} | "
                    f"{frozen} | {drift} |")
    return "\n".join(rows)


def examples_note(data: dict, tasks: list[str]) -> str:
    """How many held-out examples each score rests on, and what one example weighs."""
    counts = {t: min((s.get("_n", {}).get(t) for s in data["scores"].values()
                      if s.get("_n", {}).get(t)), default=None) for t in tasks}
    known = {t: n for t, n in counts.items() if n}
    if not known:
        return ""
    if len(set(known.values())) == 1:
        n = next(iter(known.values()))
        return (f"Each score is the share of **{n} held-out examples** of its task: one "
                f"example moves a score by 1/{n} = {1 / n:.3f}.")
    return "Held-out examples per score: " + ", ".join(
        f"{t} {n} (one example = {1 / n:.3f})" for t, n in known.items()) + "."


def freeze_checks(run_dir: Path) -> list[dict]:
    """The end-of-stage frozen-element check of every SFT stage that froze elements (from its
    ``freeze.json`` and manifest): counts from the masks, compared bit for bit, held in the
    ranks' partitions, and the verdict."""
    rows = []
    stages = sorted(run_dir.glob("sft/stage-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    for d in stages + sorted(run_dir.glob("baselines/*/stage-*")):
        try:
            man = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        row = {"stage": str(d.relative_to(run_dir)), "tasks": man.get("tasks", []),
               "frozen_tasks": man.get("frozen_tasks", [])}
        try:
            facts = json.loads((d / "freeze.json").read_text())
            if "frozen" not in facts:  # evolving isolation alone: its own section
                raise ValueError
        except (OSError, ValueError):
            if row["frozen_tasks"]:
                row["verdict"] = "no freeze report"
                rows.append(row)
            elif d.parent.name == "sft":
                rows.append({**row, "verdict": "nothing frozen"})
            continue
        bad = facts.get("mismatched_tensors") or facts.get("partition_mismatches")
        same = len({facts.get("frozen"), facts.get("checked"),
                    facts.get("frozen_in_partitions")}) == 1
        row.update(frozen=facts.get("frozen"), checked=facts.get("checked"),
                   partitions=facts.get("frozen_in_partitions"),
                   mismatches=len(facts.get("mismatched_tensors") or [])
                   + int(facts.get("partition_mismatches") or 0),
                   verdict="bit-identical" if same and not bad else "FAILED")
        rows.append(row)
    return rows


def _freeze_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no SFT stage froze elements)"
    out = ["| stage | trains | frozen cores of | frozen (masks) | compared bit for bit | "
           "held in partitions | mismatches | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        num = [f"{r[k]:,}" if isinstance(r.get(k), int) else "-"
               for k in ("frozen", "checked", "partitions", "mismatches")]
        out.append(f"| {r['stage']} | {', '.join(r['tasks'])} | "
                   f"{', '.join(r['frozen_tasks']) or '-'} | " + " | ".join(num)
                   + f" | {r['verdict']} |")
    return "\n".join(out)


def write_report(run_dir: str | Path, cfg) -> dict:
    """Writes the report; returns {path, html, table (markdown), rows}."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    scores_file = run_dir / "eval" / "scores.json"
    data = json.loads(scores_file.read_text()) if scores_file.is_file() else None
    tasks = [t.name for t in cfg.tasks]
    with atomic_dir(out, overwrite=True) as tmp:
        figures, table, rows, note = [], "(no evaluation: no task has eval_data)", [], ""
        if data:
            scores = {m: {t: v for t, v in s.items() if not t.startswith("_")}
                      for m, s in data["scores"].items()}
            by_method, single = _methods(scores, tasks, cfg.sft.method)
            rows = seesaw_table(by_method, single, tasks)
            table = format_table(rows, tasks)
            note = examples_note(data, tasks)
            _plot_scores(by_method, tasks, tmp / "scores.png")
            figures.append(("Per-task scores per method", "scores.png"))
        groups_png = run_dir / "groups.jaccard.png"
        if groups_png.is_file():
            (tmp / "jaccard.png").write_bytes(groups_png.read_bytes())
            figures.append(("Jaccard overlap of core regions, with the groups", "jaccard.png"))
        stats_file = run_dir / "analysis" / "stats.json"
        if stats_file.is_file():
            _plot_core_share(json.loads(stats_file.read_text()), tmp / "core-share.png")
            figures.append(("Core-region share per layer and module type", "core-share.png"))
        if _plot_losses(run_dir, tmp / "losses.png"):
            figures.append(("Training loss per SFT stage", "losses.png"))
        epi = epi_logs(run_dir)
        if _plot_drift(epi, tmp / "isolation-drift.png"):
            figures.append(("Isolation drift (evolving isolation)", "isolation-drift.png"))
        groups = json.loads((run_dir / "groups.json").read_text()) \
            if (run_dir / "groups.json").is_file() else {"stages": []}
        stages = "\n".join(f"- stage {s['stage']}: {', '.join(s['tasks'])}"
                           for s in groups["stages"])
        checks = freeze_checks(run_dir)
        freeze_md = _freeze_markdown(checks)
        md = [f"# CPI-FT run `{cfg.name}`", "",
              f"Base: `{cfg.base}`; tasks: {', '.join(tasks)}; p = {cfg.analysis.p}, "
              f"tau = {cfg.grouping.tau}; SFT: {cfg.sft.method}, {cfg.sft.steps} steps; "
              f"baselines: {', '.join(cfg.baselines) or 'none'}.", "",
              "## Seesaw table", "",
              "Held-out score per task; worst drop = the largest loss against a task's own "
              "single-task model (lower is better).", "", *([note, ""] if note else []),
              table, "",
              "## Stages (groups)", "", stages or "-", "",
              "## Frozen-element check of every stage", "",
              "At the end of each stage the frozen elements (the union of earlier stages' core "
              "masks) are compared with the stage input bit for bit; the stage fails unless "
              "the masks' count, the elements compared and those held in the ranks' "
              "partitions agree and nothing moved.", "", freeze_md, ""]
        if epi:
            md += ["## Evolving isolation", "",
                   "Frozen sets refreshed from the EMA of gradient importance (exact global "
                   "top-p of the layer-normalised scores); between two refreshes every frozen "
                   "element is checked bit-identical.", "", _epi_markdown(epi), ""]
        for title, f in figures:
            md += [f"## {title}", "", f"![{title}]({f})", ""]
        (tmp / "report.md").write_text("\n".join(md))
        body = [f"<h1>CPI-FT run <code>{html.escape(cfg.name)}</code></h1>",
                f"<p>{html.escape(md[2])}</p>", "<h2>Seesaw table</h2>",
                f"<p>{html.escape(note.replace('**', ''))}</p>" if note else "",
                _html_table(rows, tasks),
                "<h2>Stages (groups)</h2><ul>" + "".join(
                    f"<li>stage {s['stage']}: {html.escape(', '.join(s['tasks']))}</li>"
                    for s in groups["stages"]) + "</ul>",
                "<h2>Frozen-element check of every stage</h2>" + _freeze_html(checks)]
        if epi:
            body.append("<h2>Evolving isolation</h2><pre>" + html.escape(_epi_markdown(epi))
                        + "</pre>")
        for title, f in figures:
            b64 = base64.b64encode((tmp / f).read_bytes()).decode()
            body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                        f"src='data:image/png;base64,{b64}' style='max-width:100%'>")
        (tmp / "report.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>cpift report</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
            "td,th{border:1px solid #ccc;padding:3px 8px}table{border-collapse:collapse}"
            "</style></head><body>" + "\n".join(body) + "</body></html>\n")
    return {"path": out / "report.md", "html": out / "report.html", "table": table, "rows": rows}


def _html_table(rows: list[dict], tasks: list[str]) -> str:
    if not rows:
        return "<p>(no evaluation)</p>"
    head = "".join(f"<th>{html.escape(t)}</th>" for t in [*tasks, "average", "worst drop"])
    out = [f"<table><tr><th>method</th>{head}</tr>"]
    for r in rows:
        cells = [f"{r[t]:.3f}" if r[t] is not None else "-" for t in tasks]
        cells.append(f"{r['average']:.3f}" if r["average"] is not None else "-")
        cells.append(f"{r['worst_drop']:+.3f}" if r["worst_drop"] is not None else "-")
        out.append(f"<tr><td>{html.escape(r['method'])}</td>"
                   + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def _freeze_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>(no SFT stage froze elements)</p>"
    head = "".join(f"<th>{h}</th>" for h in ("stage", "trains", "frozen cores of",
                                              "frozen (masks)", "compared bit for bit",
                                              "held in partitions", "mismatches", "verdict"))
    out = [f"<table><tr>{head}</tr>"]
    for r in rows:
        cells = [r["stage"], ", ".join(r["tasks"]), ", ".join(r["frozen_tasks"]) or "-",
                 *(f"{r[k]:,}" if isinstance(r.get(k), int) else "-"
                   for k in ("frozen", "checked", "partitions", "mismatches")), r["verdict"]]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"
