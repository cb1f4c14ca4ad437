"""The report of a run: a time-to-accuracy table and PNG plots from its ``output_dir``.

    python -m hvdet.report runs/demo            # prints the table, writes runs/demo/plots/*.png

Reads ``metrics.jsonl`` and, when the run has finished, ``summary.json`` (both written by
:class:`hvdet.runlog.RunLogger`); a run still in progress is reported from its metrics alone.
Plots: box (and mask) AP vs wall-clock time with the target and the time-to-target marked, loss and
lr vs iteration, and throughput with the per-phase step time.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hvdet.runlog import METRICS_FILE, SUMMARY_FILE, SUMMARY_KEYS, read_jsonl

IOU_TYPES = ("bbox", "segm")
PHASES = ("data_s", "forward_s", "backward_allreduce_s", "optimizer_s")


@dataclass
class RunRecords:
    """What a run's output_dir holds, read back (metrics.jsonl, summary.json): the report's input.
    Not :class:`hvdet.run.Run`, the live training state."""

    run_dir: Path
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def targets(self) -> dict[str, float]:
        """``{"bbox": 0.366}``: the AP the run had to reach per IoU type (empty when it had none)."""
        target = self.summary.get("target") or {}
        return {k: float(v) for k, v in target.items() if v is not None} if isinstance(target, dict) else {}

    def time_to_target_s(self) -> float | None:
        """From the summary; for an unfinished run, the first evaluation that met every target."""
        if "time_to_target_s" in self.summary:
            return self.summary["time_to_target_s"]
        if not self.targets:
            return None
        for record in self.evals:
            if all(ap_of(record, kind) is not None and ap_of(record, kind) >= t for kind, t in self.targets.items()):
                return record.get("elapsed_s")
        return None


def ap_of(record: dict, iou_type: str = "bbox") -> float | None:
    """An eval record's AP for ``iou_type``, None where missing or undefined."""
    ap = (record.get(iou_type) or {}).get("AP")
    return None if ap is None or ap < 0 else ap  # pycocotools writes -1 for "undefined"


def load_run(run_dir: str | Path) -> RunRecords:
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: is {run_dir} a run's output_dir?")
    run = RunRecords(run_dir)
    for record in read_jsonl(metrics):
        if record.get("type") in ("train", "eval"):  # not the events (world, init_from): no points of a curve
            (run.evals if record["type"] == "eval" else run.train).append(record)
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        try:
            run.summary = json.loads(summary.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{summary}: not valid JSON ({err})") from err
    return run


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(float(seconds), 60)
    return f"{int(minutes)} min {s:04.1f} s ({seconds:.1f} s)"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary_table(run: RunRecords) -> str:
    """The time-to-accuracy summary and the evaluation history, as plain text."""
    s, last = run.summary, (run.train[-1] if run.train else {})
    rows = [
        ["run", str(run.run_dir)],
        ["status", "finished" if s else "in progress (no summary.json yet)"],
        ["target", _fmt(run.targets) if run.targets else "-"],
        ["reached", _fmt(s.get("reached")) if s else "-"],
        ["time to target", _duration(run.time_to_target_s())],
        ["best", _fmt(s.get("best") if s else _best(run))],
        ["world size", _fmt(s.get("world_size"))],
        ["global batch size", _fmt(s.get("global_batch_size"))],
        ["images/s", _fmt(s.get("images_per_s", last.get("images_per_s")))],
        ["train time", _duration(s.get("train_s"))],
        ["eval time", _duration(s.get("eval_s"))],
        ["iterations", _fmt(s.get("iterations", last.get("iteration")))],
    ]
    rows += [[k, _fmt(v)[:100]] for k, v in s.items() if k not in SUMMARY_KEYS]
    out = [_table(rows, ["", "value"])]
    if run.evals:
        kinds = [k for k in IOU_TYPES if any(k in e for e in run.evals)]
        header = ["iteration", "elapsed", *[f"{k} {m}" for k in kinds for m in ("AP", "AP50", "AP75")]]
        body = [[_fmt(e.get("iteration")), _duration(e.get("elapsed_s")).split(" (")[0],
                 *[_fmt((e.get(k) or {}).get(m)) for k in kinds for m in ("AP", "AP50", "AP75")]] for e in run.evals]
        out.append(_table(body, header))
    return "\n\n".join(out)


def _best(run: RunRecords) -> dict:
    return {k: max(aps) for k in IOU_TYPES if (aps := [a for e in run.evals if (a := ap_of(e, k)) is not None])}


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _series(records: list[dict], key: str, x: str = "iteration") -> tuple[list, list]:
    pairs = [(r[x], r[key]) for r in records if r.get(x) is not None and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run: RunRecords, out_dir: str | Path | None = None) -> list[Path]:
    """Write map_vs_time.png, loss_lr.png, throughput.png and, when the records have them,
    diagnostics.png (trust ratios, AGVM's variances); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir or run.run_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    plots = [("map_vs_time.png", _plot_map), ("loss_lr.png", _plot_loss_lr), ("throughput.png", _plot_throughput)]
    if any("trust_ratio" in r for r in run.train):  # log.diagnostics
        plots.append(("diagnostics.png", _plot_diagnostics))
    for name, draw in plots:
        fig = draw(run, plt)
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def _plot_map(run: RunRecords, plt):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"bbox": "tab:blue", "segm": "tab:orange"}
    for kind in IOU_TYPES:
        pts = [(e["elapsed_s"] / 60, a) for e in run.evals if e.get("elapsed_s") is not None
               and (a := ap_of(e, kind)) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colors[kind], label=f"{kind} AP@[.5:.95]")
        if kind in run.targets:
            ax.axhline(run.targets[kind], color=colors[kind], ls="--", lw=1,
                       label=f"{kind} target {run.targets[kind]:.3g}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    tta = run.time_to_target_s()
    if tta is not None:
        ax.axvline(tta / 60, color="tab:green", lw=1.2)
        ax.annotate(f"target reached\n{tta / 60:.2f} min", (tta / 60, 0), xytext=(4, 8),
                    textcoords="offset points", color="tab:green", fontsize=9)
    ax.set(xlabel="wall-clock time (min)", ylabel="COCO AP", title=_title(run, "accuracy vs time"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    return fig


def _plot_loss_lr(run: RunRecords, plt):
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    ax_loss.plot(*_series(run.train, "loss"), color="black", lw=1.5, label="total")
    names = sorted({k for r in run.train for k in (r.get("losses") or {})})
    for name in names:
        pts = [(r["iteration"], r["losses"][name]) for r in run.train
               if isinstance((r.get("losses") or {}).get(name), (int, float))]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), lw=0.9, label=name)
    ax_loss.set(ylabel="loss", title=_title(run, "training loss and learning rate"))
    ax_loss.grid(alpha=0.3)
    if run.train:
        ax_loss.legend(fontsize=7, ncol=2)
    ax_lr.plot(*_series(run.train, "lr"), color="tab:red")
    ax_lr.set(xlabel="iteration", ylabel="lr")
    ax_lr.grid(alpha=0.3)
    return fig


def _plot_throughput(run: RunRecords, plt):
    fig, (ax_ips, ax_ph) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax_ips.plot(*_series(run.train, "images_per_s"), color="tab:purple")
    ax_ips.set(ylabel="images/s (all ranks)", title=_title(run, "throughput"))
    ax_ips.grid(alpha=0.3)
    iters = [r["iteration"] for r in run.train]
    stacks = [[float(r.get(p) or 0.0) for r in run.train] for p in PHASES]
    if iters and any(any(s) for s in stacks):
        ax_ph.stackplot(iters, *stacks, labels=[p.removesuffix("_s") for p in PHASES], alpha=0.8)
    ax_ph.plot(*_series(run.train, "max_data_s"), "k:", lw=1.2, label="data, slowest rank")
    if ax_ph.get_legend_handles_labels()[0]:
        ax_ph.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5, frameon=False)
    ax_ips.set_ylim(bottom=0)
    ax_ph.set(xlabel="iteration", ylabel="s per iteration (mean)")
    ax_ph.grid(alpha=0.3)
    return fig


def _plot_diagnostics(run: RunRecords, plt):
    """LargeDet Fig. 3's trust ratios ||w|| / ||g|| per module (median, min-max band) and, with AGVM,
    its per-module gradient variances: how far apart the modules' effective step sizes are."""
    fig, (ax_tr, ax_var) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for ax, key, label in ((ax_tr, "trust_ratio", "trust ratio ||w|| / ||g||"),
                           (ax_var, "agvm_variance", "AGVM gradient variance")):
        modules = sorted({m for r in run.train for m in (r.get(key) or {})})
        for m in modules:
            rows = [(r["iteration"], r[key][m]) for r in run.train if m in (r.get(key) or {})]
            iters = [i for i, _ in rows]
            if key == "trust_ratio":
                ax.plot(iters, [v["median"] for _, v in rows], lw=1.2, label=m)
                ax.fill_between(iters, [v["min"] for _, v in rows], [v["max"] for _, v in rows], alpha=0.15)
            else:
                ax.plot(iters, [v for _, v in rows], "o-", ms=3, lw=1.2, label=m)
        if modules:
            ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=3)
        else:
            ax.text(0.5, 0.5, "not logged (AGVM off)", ha="center", va="center", transform=ax.transAxes)
        ax.set(ylabel=label)
        ax.grid(alpha=0.3, which="both")
    ax_tr.set_title(_title(run, "per-module trust ratios and gradient variances"))
    ax_var.set_xlabel("iteration")
    return fig


def _title(run: RunRecords, what: str) -> str:
    s = run.summary
    if {"world_size", "global_batch_size"} <= set(s):
        what += f" -- {s['world_size']} ranks, batch {s['global_batch_size']}"
    return f"{run.run_dir.name}: {what}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdet.report", description="Summarize a hvdet run directory.")
    parser.add_argument("run_dir", help="a run's output_dir (holding metrics.jsonl, summary.json)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"hvdet.report: {err}", file=sys.stderr)
        return 2
    print(summary_table(run))
    if not args.no_plots:
        paths = plot_run(run)
        print("\nplots: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
