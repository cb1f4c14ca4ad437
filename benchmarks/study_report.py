"""The batch-size study's report (benchmarks/study.py): one row per cell from its run directory, then
``results.json``, ``results.md`` and three plots in the runs directory: final AP vs batch, AP vs
epoch, and the diagnostics vs batch (LargeDet Fig. 3's trust ratios, AGVM's variances and lr scales).

A cell's status is its summary's ``stop`` (max_iters, target, diverged, eval_failed, preempted),
``failed`` when its directory holds no summary (a crash or a kill: the next invocation runs it
again), or ``pending`` before it ran. Final AP is the last evaluation's box AP@[.5:.95] of a run
that finished its schedule; a diverged cell has none and is drawn as the papers draw "Failed".
Epochs on the curves are iteration x global batch / train images. A cell's diagnostics are the
median over its train records (``log.diagnostics``) of each module's median trust ratio
||w|| / ||g||, and of AGVM's per-module gradient variance and lr scale where AGVM ran.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks.provenance import provenance
from hvdet.report import ap_of
from hvdet.runlog import METRICS_FILE, SUMMARY_FILE, read_jsonl

LOG_FILE = "train.log"
FINISHED = ("max_iters", "target")
DIVERGED_MARK = "diverged at iteration"  # train.py's message (hvdet.step.DivergenceError)


def divergence_line(log: Path) -> str | None:
    """The first line of a cell's console output that reports a divergence."""
    if not log.is_file():
        return None
    return next((line.strip() for line in log.read_text(errors="replace").splitlines() if DIVERGED_MARK in line), None)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(cell, train_images: int) -> dict:
    """One row of the table from ``cell``'s run directory (``cell``: a benchmarks.study.Cell)."""
    run_dir = Path(cell.output_dir)
    summary, launch = _read_json(run_dir / SUMMARY_FILE), _read_json(run_dir / "cell.json")
    metrics = run_dir / METRICS_FILE
    records = read_jsonl(metrics) if metrics.is_file() else []
    evals = [r for r in records if r.get("type") == "eval"]
    to_epoch = cell.batch / train_images
    curve = [[round(r["iteration"] * to_epoch, 4), ap] for r in evals if (ap := ap_of(r)) is not None]
    # No summary: pending (never started), incomplete (running, or its study was stopped: it runs again),
    # or failed (its launcher returned without a summary: a crash).
    status = summary.get("stop") or ("pending" if not run_dir.exists() else
                                     "failed" if "exit_code" in launch else "incomplete")
    iterations = summary.get("iterations")
    return {"cell": cell.name, "batch": cell.batch, "optimizer": cell.optimizer, "norm": cell.norm,
            "seed": cell.seed, "tag": cell.tag, "label": cell.label or cell.optimizer, "base_lr": cell.base_lr,
            "steps": cell.steps,
            "images_per_gpu": cell.images_per_gpu, "passes": cell.passes, "bn_size": cell.bn_size, "lr": cell.lr,
            "max_iters": cell.max_iters, "warmup_iters": cell.warmup_iters, "status": status,
            "final_ap": curve[-1][1] if curve and status in FINISHED else None,
            "best_ap": max((ap for _, ap in curve), default=None), "iterations": iterations,
            "stop_epoch": round(iterations * to_epoch, 4) if iterations is not None else None,
            "time_s": summary.get("elapsed_s"), "wall_s": launch.get("wall_s"), "failure": summary.get("failure"),
            "load_avg": [launch.get("load_avg_start"), launch.get("load_avg_end")],
            "curve": curve, "diagnostics": diagnostics([r for r in records if r.get("type") == "train"])}


def diagnostics(train: list[dict]) -> dict:
    """{trust_ratio | agvm_variance | agvm_lr_scale: {module: median over the run}} from train records
    (a trust ratio record holds each module's min / median / max: its median is taken)."""
    out = {}
    for key in ("trust_ratio", "agvm_variance", "agvm_lr_scale"):
        per_module: dict[str, list[float]] = {}
        for rec in (r for r in train if r.get(key)):
            for module, value in rec[key].items():
                value = value["median"] if isinstance(value, dict) else value
                if value is not None and math.isfinite(value):
                    per_module.setdefault(module, []).append(value)
        if per_module:
            out[key] = {m: statistics.median(v) for m, v in per_module.items()}
    return out


def write_report(grid: dict, cells: list, dataset: dict, runs_dir: Path) -> list[Path]:
    """results.json, results.md, ap_vs_batch.png, ap_vs_epoch.png and diagnostics_vs_batch.png under
    ``runs_dir``."""
    rows = [collect(c, dataset["train_images"]) for c in cells]
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    doc = {"study": "global batch x optimizer x normalization (benchmarks/study.py)", "grid": grid,
           "dataset": dataset, "provenance": provenance(), "noise": noise(rows), "cells": rows}
    paths = [runs_dir / "results.json", runs_dir / "results.md", runs_dir / "ap_vs_batch.png",
             runs_dir / "ap_vs_epoch.png", runs_dir / "diagnostics_vs_batch.png"]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(markdown(doc))
    plot(rows, *paths[2:])
    return paths


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def _num(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def cells_table(cells: list, ranks: int) -> str:
    """What ``--dry-run`` prints: each cell's derived settings, one line each."""
    header = (f"{'cell':<28} {'batch':>5} {'img/GPU x ranks x passes':>24} {'BN size':>7} {'lr':>8} "
              f"{'iterations':>10} {'lr steps':>12} {'warmup':>6} {'eval every':>10}")
    lines = [header]
    for c in cells:
        layout, steps = f"{c.images_per_gpu} x {ranks} x {c.passes}", "/".join(map(str, c.steps)) or "-"
        lines.append(f"{c.name:<28} {c.batch:>5} {layout:>24} {c.bn_size:>7} {c.lr:>8.4g} {c.max_iters:>10} "
                     f"{steps:>12} {c.warmup_iters:>6} {c.eval_interval:>10}")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    g, d, prov = doc["grid"], doc["dataset"], doc["provenance"]
    lrs = ", ".join([f"{k} {v:g}" for k, v in g["base_lr"].items()]
                    + [f"{k}: the best of {v} at batch {g['reference_batch']}"
                       for k, v in g.get("anchor_sweeps", {}).items()])
    commit = ((prov.get("commit") or "unknown")[:7]
              + (" with uncommitted changes" if prov.get("uncommitted_changes") else ""))
    floor = f", at least {g['warmup_iters']} iterations" if g.get("warmup_iters") else ""
    pre = g.get("pretrain")
    start = (f" Every cell starts from a pretrained backbone (box AP {pre['final_ap']:.3f} on its own set after "
             f"{pre['iterations']} iterations; sha256 {str(pre['sha256'])[:12]})."
             if pre and pre.get("final_ap") else "")
    intro = (f"Grid `{g['file']}`: {g['ranks']} ranks, {g['epochs']:g} epochs at every batch (lr x0.1 at epochs "
             f"{g['step_epochs']}), warmup {g['warmup_epochs']:g} epochs{floor}, lr = base_lr x batch / "
             f"{g['reference_batch']} (base_lr: {lrs}). Data: the {d['preset']} synthetic set, {d['train_images']} "
             f"train images.{start} Code: {commit}. AP is box AP@[.5:.95] on the val set; \"diverged\" is the "
             "papers' \"Failed\"; time is training + evaluation, start-up excluded.")
    lines = ["# Batch-size study: results", "", intro, "",
             ("| cell | batch | optimizer | norm | BN size | lr | warmup | final AP | best AP | iterations | time "
              "| stop |"),
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in doc["cells"]:
        done = "-" if r["iterations"] is None else f"{r['iterations']} / {r['max_iters']}"
        time_s = "-" if r["time_s"] is None else f"{r['time_s']:.0f} s"
        lines.append(f"| {r['cell']} | {r['batch']} | {r['optimizer']} | {r['norm']} | {r['bn_size']} | "
                     f"{r['lr']:.4g} | {r.get('warmup_iters', '-')} | {_num(r['final_ap'])} | {_num(r['best_ap'])} | "
                     f"{done} | {time_s} | {r['status']} |")
    noise = doc.get("noise")
    if noise and noise["pairs"]:
        summary = (f"Seeds (same cell, another seed: initialization of the heads, data order): "
                   f"{len(noise['pairs'])} pairs, largest range {noise['max_range']:.3f} AP; noise threshold "
                   f"max(0.02, 2 x that) = **{noise['threshold']:.3f} AP**: smaller differences are not effects.")
        lines += ["", summary, "",
                  "| cell | seeds | final APs | range |", "| --- | --- | --- | ---: |"]
        lines += [f"| {p['cell']} | {p['seeds']} | {', '.join(_num(a) for a in p['aps'])} | {p['range']:.3f} |"
                  for p in noise["pairs"]]
    return "\n".join(lines) + "\n"


def noise(rows: list[dict], floor: float = 0.02) -> dict:
    """The seed spread: for every cell run with more than one seed (all finished), its final APs and
    their range; the threshold below which a difference is not called an effect is max(floor, 2 x the
    largest range) (issue 20's rule)."""
    groups: dict[str, list[dict]] = {}
    names = {r["cell"] for r in rows}
    for r in rows:
        base = r["cell"].rsplit("-s", 1)[0] if r.get("seed") else r["cell"]
        # A second seed of the anchor's winner pairs with the anchor sweep's cell of the same lr (its
        # seed-0 run is named for the sweep: b16-pmdlamb-cross_gpu-lr0.4).
        swept = f"{base}-lr{r['base_lr']:g}" if r.get("seed") and "base_lr" in r else None
        if base not in names and swept in names:
            base = swept
        groups.setdefault(base, []).append(r)
    pairs = []
    for cell, members in groups.items():
        aps = [m["final_ap"] for m in sorted(members, key=lambda m: m.get("seed", 0))]
        if len(members) > 1 and all(a is not None for a in aps):
            pairs.append({"cell": cell, "seeds": sorted(m.get("seed", 0) for m in members), "aps": aps,
                          "range": max(aps) - min(aps)})
    widest = max((p["range"] for p in pairs), default=0.0)
    return {"pairs": pairs, "max_range": widest, "threshold": max(floor, 2 * widest)}


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _order(rows: list[dict], key: str) -> list:
    return list(dict.fromkeys(r[key] for r in rows))


def plot(rows: list[dict], batch_png: Path, epoch_png: Path, diagnostics_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    # One line per label (optimizer, or optimizer+control tag), seed 0 only (other seeds: the noise table).
    rows = [{**r, "optimizer": r.get("label") or r["optimizer"]} for r in rows if not r.get("seed")]
    labels = _order(rows, "optimizer")
    # tab10's colours repeat after ten lines; a grid with its controls has more (20 distinct in tab20)
    palette = (lambda i: f"C{i}") if len(labels) <= 10 else (lambda i: plt.get_cmap("tab20")(i % 20))
    colours = {o: palette(i) for i, o in enumerate(labels)}
    styles = {n: ("-", "--", ":", "-.")[i % 4] for i, n in enumerate(_order(rows, "norm"))}
    for path, draw in ((batch_png, _ap_vs_batch), (epoch_png, _ap_vs_epoch), (diagnostics_png, _diagnostics_vs_batch)):
        fig = draw(rows, plt, colours, styles)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


def _ap_vs_batch(rows, plt, colours, styles):
    """Final AP against the global batch (log2 axis), one panel per norm, one line per optimizer;
    a diverged cell is an 'x' at the bottom with "Failed", as in LargeDet's Table 1."""
    norms, batches = _order(rows, "norm"), sorted(_order(rows, "batch"))
    fig, axes = plt.subplots(1, len(norms), figsize=(5.5 * len(norms), 4.2), sharey=True, squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        failed_at: dict[int, int] = {}
        for opt, colour in colours.items():
            mine = sorted((r for r in rows if r["norm"] == norm and r["optimizer"] == opt), key=lambda r: r["batch"])
            done = [(r["batch"], r["final_ap"]) for r in mine if r["final_ap"] is not None]
            if done:
                ax.plot(*zip(*done, strict=True), "o-", color=colour, label=opt)
            for r in (r for r in mine if r["status"] == "diverged"):
                k = failed_at[r["batch"]] = failed_at.get(r["batch"], -1) + 1
                ax.plot(r["batch"], 0, "x", color=colour, ms=10, mew=2, label=None if done else opt)
                ax.annotate("Failed", (r["batch"], 0), xytext=(0, 8 + 10 * k), textcoords="offset points",
                            ha="center", color=colour, fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_ylim(bottom=0)
        ax.set(xlabel="global batch (images)", title=f"norm: {norm}")
        ax.grid(alpha=0.3)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "no finished cell yet", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel("final box AP@[.5:.95]")
    fig.suptitle("final AP vs global batch (the same epochs at every batch; a label's xN: N times the iterations)")
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)}
    if handles:  # one legend right of the panels, off the points (savefig's tight box takes it in)
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return fig


def _ap_vs_epoch(rows, plt, colours, styles):
    """AP against epochs, one panel per global batch, one line per optimizer x norm."""
    batches = sorted(_order(rows, "batch"))
    cols = max(1, math.ceil(math.sqrt(len(batches))))  # 4 batches: 2 x 2 panels
    nrows = -(-len(batches) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), sharey=True, squeeze=False)
    for ax, batch in zip(axes.flat, batches, strict=False):
        for r in (r for r in rows if r["batch"] == batch):
            colour, style = colours[r["optimizer"]], styles[r["norm"]]
            if r["curve"]:
                ax.plot(*zip(*r["curve"], strict=True), style, marker=".", color=colour,
                        label=f"{r['optimizer']}, {r['norm']}")
            if r["status"] == "diverged":
                ax.plot(r["stop_epoch"] if r["stop_epoch"] is not None else 0, 0, "x", color=colour, ms=9, mew=2,
                        label=f"{r['optimizer']}, {r['norm']}: Failed")
        ax.set(title=f"batch {batch}", xlabel="epoch")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(batches):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("box AP@[.5:.95]")
    fig.suptitle("AP vs epoch per global batch (the same epochs at every batch; a label's xN: N times the iterations)")
    fig.tight_layout()
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)}
    if handles:  # one legend for every panel, right of them (savefig's tight box takes it in)
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return fig


def _diagnostics_vs_batch(rows, plt, colours, styles):
    """Per module (a column each): the median trust ratio of every cell against the batch (top row,
    one line per optimizer x norm), and AGVM's lr scale where it ran (bottom row)."""
    modules = list(dict.fromkeys(m for r in rows for m in r.get("diagnostics", {}).get("trust_ratio", {})))
    modules = modules or ["backbone"]
    batches = sorted(_order(rows, "batch"))
    fig, axes = plt.subplots(2, len(modules), figsize=(3.6 * len(modules), 6.4), sharex=True, squeeze=False)
    for col, module in enumerate(modules):
        for row, (key, label) in enumerate((("trust_ratio", "median trust ratio ||w|| / ||g||"),
                                            ("agvm_lr_scale", "AGVM lr scale"))):
            ax = axes[row][col]
            for opt in colours:
                for norm in styles:
                    pts = sorted((r["batch"], v) for r in rows if r["optimizer"] == opt and r["norm"] == norm
                                 and (v := r.get("diagnostics", {}).get(key, {}).get(module)) is not None)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), styles[norm], marker="o", color=colours[opt],
                                label=f"{opt}, {norm}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            if key == "trust_ratio" and ax.lines:
                ax.set_yscale("log")
            ax.set(title=module if row == 0 else None, xlabel="global batch" if row == 1 else None)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle("diagnostics vs global batch: trust ratios (LargeDet Fig. 3) and AGVM's lr scales, "
                 "medians over each run")
    fig.tight_layout()
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return fig
