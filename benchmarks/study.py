"""The batch-size study (issues 10 and 20): a grid of train.py runs under LargeDet's protocol, resumable,
collected into tables and plots (docs/study.md).

    .venv/bin/python benchmarks/study.py                        # the grid of configs/study/study_large_batch.yaml
    .venv/bin/python benchmarks/study.py --dry-run              # its cells and their derived settings
    .venv/bin/python benchmarks/study.py --batches 16 64 --optimizers sgd pmdlamb --norms local
    .venv/bin/python benchmarks/study.py --report-only          # table and plots from the run dirs

A cell is one ``horovodrun -np RANKS python train.py --config RECIPE key=value ...`` run in
``RUNS/<cell>/`` (its console output in ``train.log``, its derived settings in ``cell.json``); the
grid's format and the cells it derives are benchmarks/study_grid.py's.

Resuming: a cell whose summary.json exists is done and skipped; a cell that diverged is recorded as
"diverged" (the papers' "Failed"), not retried and not tuned; a cell that crashed or was interrupted
has no summary and runs again (its partial directory is moved to ``<cell>.incomplete``). After every
cell, RUNS/results.json, results.md and the plots are rebuilt (benchmarks/study_report.py) and, with
the grid's ``archive:``, copied with the cell's small files to the committed archive, from which a
new checkout restores the finished cells.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import ROOT, provenance
from benchmarks.study_grid import (  # noqa: F401 - the grid's names, re-exported for callers and tests
    CELL_FILE,
    DEFAULT_GRID,
    Cell,
    Grid,
    anchors,
    cell_name,
    cell_specs,
    derive_cells,
    ensure_data,
    load_grid,
    pretrain_cell,
    pretrained_checkpoint,
)
from benchmarks.study_report import LOG_FILE, cells_table, collect, divergence_line, write_report
from hvdet.dataclass_yaml import ConfigError


def launch_command(grid: Grid, cell: Cell, controller: str | None) -> list[str]:
    bin_dir = Path(sys.executable).parent
    return [str(bin_dir / "horovodrun"), "-np", str(grid.ranks), "-H", f"localhost:{grid.ranks}",
            *([f"--{controller}"] if controller else []),
            sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / grid.recipe), *cell.overrides]


def run_cell(grid: Grid, cell: Cell, controller: str | None, timeout_s: float) -> None:
    """One train.py launch; a divergence that left no summary.json gets one, so it is not retried."""
    run_dir = Path(cell.output_dir)
    if run_dir.exists():  # crashed or interrupted before its summary: train.py refuses a used output_dir
        aside = run_dir.with_name(run_dir.name + ".incomplete")
        if aside.exists():
            import shutil

            shutil.rmtree(aside)
        run_dir.rename(aside)
    run_dir.mkdir(parents=True)
    cmd = launch_command(grid, cell, controller)
    _write_json(run_dir / CELL_FILE, {**asdict(cell), "command": cmd})
    # Ranks share the cores: one math thread each, as make demo runs (and the run is repeatable).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    start, code, load_start, code_at_start = time.perf_counter(), None, os.getloadavg(), provenance()
    with open(run_dir / LOG_FILE, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.write(f"\nstudy: killed after {timeout_s:.0f} s\n")
        finally:
            if proc.poll() is None:  # time-out or Ctrl-C: the whole launcher tree, so no rank lives on
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    # The machine's 1/5/15-minute load averages at the start and the end: a cell's minutes mean
    # something only beside what else ran (its own two ranks make about 2).
    _write_json(run_dir / CELL_FILE, {**asdict(cell), "command": cmd, "exit_code": code,
                                      "wall_s": time.perf_counter() - start, "load_avg_start": load_start,
                                      "load_avg_end": os.getloadavg(), "provenance": code_at_start})
    summary = run_dir / "summary.json"
    if not summary.exists() and (line := divergence_line(run_dir / LOG_FILE)):
        _write_json(summary, {"stop": "diverged", "failure": line, "written_by": "benchmarks/study.py"})


def done(run_dir: Path) -> bool:
    """A cell ran to its end (or diverged): it has a summary that is not a preemption's. Stopping the
    study stops its cell's ranks with SIGTERM, and train.py then checkpoints and writes a "preempted"
    summary: such a cell runs again from the start."""
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("stop") != "preempted"


# A finished cell's files that the report reads, small enough to commit (no checkpoints, no events).
ARCHIVED = ("summary.json", CELL_FILE, "metrics.jsonl", "config.yaml", LOG_FILE)


def archive_cells(cells: list[Cell], archive: Path) -> int:
    """Copy each finished cell's small files to ``archive/cells/<name>/``; the number copied now."""
    import shutil

    copied = 0
    for cell in cells:
        run_dir, kept = Path(cell.output_dir), archive / "cells" / cell.name
        if not done(run_dir) or (kept / "summary.json").is_file():
            continue
        kept.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, kept / name)
        # train.py's summary does not know the commit; the archived copy carries the one the cell ran on.
        launch = json.loads((kept / CELL_FILE).read_text()) if (kept / CELL_FILE).is_file() else {}
        summary = json.loads((kept / "summary.json").read_text())
        _write_json(kept / "summary.json", {**summary, "provenance": launch.get("provenance")})
        copied += 1
    return copied


def restore_cells(cells: list[Cell], archive: Path) -> list[str]:
    """Put the archived files of finished cells that this checkout has not run back into their run
    directories, so they count as done (the study goes on where a cut-off session stopped)."""
    import shutil

    restored = []
    for cell in cells:
        run_dir, kept = Path(cell.output_dir), archive / "cells" / cell.name
        if done(run_dir) or not (kept / "summary.json").is_file():
            continue
        if run_dir.exists():  # a partial run of a cell that has finished elsewhere
            shutil.rmtree(run_dir)
        shutil.copytree(kept, run_dir)
        restored.append(cell.name)
    return restored


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def run_grid(grid: Grid, derive, todo, dataset: dict, args, pretrain: Cell | None) -> int:
    """Run the cells not done yet, one line each, the report rebuilt after each. ``derive()`` lists the
    grid's cells and ``todo(cells)`` the selected ones: both are asked again after every cell, since a
    finished anchor sweep adds the cells that take its winner."""
    if pretrain is not None and not done(Path(pretrain.output_dir)):
        print(f"study: pretraining the starting point ({pretrain.max_iters} iterations at batch {pretrain.batch})",
              flush=True)
        run_cell(grid, pretrain, args.controller, args.cell_timeout)
        if not Path(pretrained_checkpoint(pretrain)).is_file():
            print(f"study: the pretraining run left no checkpoint; see {pretrain.output_dir}/{LOG_FILE}",
                  file=sys.stderr)
            return 1
        _compare_with_archive(grid, pretrain, dataset)
    for c in todo(derive()):
        if done(Path(c.output_dir)):
            print(f"study: {c.name}: done already (summary.json), skipped", flush=True)
    failed, spent, t0, ran = 0, [], time.perf_counter(), set()
    while True:
        cells = derive()
        pending = [c for c in todo(cells) if c.name not in ran and not done(Path(c.output_dir))]
        if not pending:
            break
        cell, i, left = pending[0], len(spent) + 1, len(pending)
        print(f"[{i}/{i - 1 + left}] {cell.name}: batch {cell.batch} = {cell.images_per_gpu} x {grid.ranks} ranks x "
              f"{cell.passes} passes, lr {cell.lr:.4g}, {cell.max_iters} iterations (warmup {cell.warmup_iters})",
              flush=True)
        start = time.perf_counter()
        run_cell(grid, cell, args.controller, args.cell_timeout)
        ran.add(cell.name)  # a crashed cell runs again at the next invocation, not in this one
        spent.append(time.perf_counter() - start)
        row = collect(cell, dataset["train_images"])
        failed += row["status"] == "failed"
        eta = sum(spent) / len(spent) * (left - 1)
        ap = "-" if row["final_ap"] is None else f"{row['final_ap']:.3f}"
        print(f"[{i}/{i - 1 + left}] {cell.name}: {row['status']}, final AP {ap}, {spent[-1]:.0f} s; "
              f"elapsed {_clock(time.perf_counter() - t0)}, ETA {_clock(eta)} (+ cells waiting for an anchor)",
              flush=True)
        publish(grid, args, pretrain, dataset, derive())
    return 1 if failed else 0


def _compare_with_archive(grid: Grid, pretrain: Cell, dataset: dict) -> None:
    """Say whether a re-made starting point is bit-identical to the one the archived cells started from."""
    archived = ROOT / grid.archive / "results.json" if grid.archive else None
    if archived is None or not archived.is_file():
        return
    before = json.loads(archived.read_text()).get("grid", {}).get("pretrain", {}).get("sha256")
    now = pretrain_doc(pretrain, dataset)["sha256"]
    same = "identical to" if before == now else "DIFFERENT from"
    print(f"study: the pretrained checkpoint (sha256 {now[:12]}) is {same} the archived cells' ({str(before)[:12]})",
          flush=True)


def publish(grid: Grid, args, pretrain: Cell | None, dataset: dict, cells: list[Cell]) -> list[Path]:
    """The report in the runs directory and, with ``archive:``, the same report and the finished cells'
    files in the archive (what a session commits after each cell)."""
    import shutil

    paths = write_report(grid_doc(grid, args, pretrain, dataset), cells, dataset, args.runs_dir)
    if grid.archive:
        archive = ROOT / grid.archive
        archive_cells(cells, archive)
        for path in paths:  # the same files: rendered once
            shutil.copy2(path, archive / path.name)
    return paths


def grid_doc(grid: Grid, args, pretrain: Cell | None = None, dataset: dict | None = None) -> dict:
    path = Path(args.grid).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    doc = {"file": str(shown), "ranks": grid.ranks, "epochs": grid.epochs, "step_epochs": grid.step_epochs,
           "warmup_epochs": grid.warmup_epochs, "warmup_iters": grid.warmup_iters,
           "reference_batch": grid.reference_batch,
           "base_lr": {n: m.base_lr for n, m in grid.optimizers.items() if m.anchor is None},
           "anchor_sweeps": grid.anchor_sweeps, "data": asdict(grid.data), "overrides": grid.overrides}
    if pretrain is not None and dataset is not None:
        doc["pretrain"] = pretrain_doc(pretrain, dataset)
    return doc


def pretrain_doc(cell: Cell, dataset: dict) -> dict:
    """The pretraining run's row and its checkpoint's sha256 (a re-made one can be compared)."""
    import hashlib

    row = collect(cell, dataset["train_images"])
    ckpt = Path(pretrained_checkpoint(cell))
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest() if ckpt.is_file() else None
    keep = ("status", "final_ap", "iterations", "max_iters", "lr", "batch", "time_s", "wall_s")
    return {**{k: row[k] for k in keep}, "checkpoint": str(ckpt), "sha256": digest, "overrides": cell.overrides}


def _filter(grid: Grid, args):
    """The cells that the --batches/--optimizers/--norms filters select (checked against the grid)."""
    sweeps, specs = cell_specs(grid)
    for key, values, known in (("batches", args.batches, {b for s in sweeps + specs for b in s.batches}),
                               ("optimizers", args.optimizers, set(grid.optimizers)),
                               ("norms", args.norms, set(grid.norms))):
        if values and (unknown := set(values) - known):
            raise ConfigError(f"--{key} {sorted(unknown)} not in the grid (it has {sorted(known)})")

    def todo(cells: list[Cell]) -> list[Cell]:
        return [c for c in cells if (not args.batches or c.batch in args.batches)
                and (not args.optimizers or c.optimizer in args.optimizers)
                and (not args.norms or c.norm in args.norms)]
    return todo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=str(DEFAULT_GRID), help="the grid file (default: %(default)s)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/study", help="one directory per cell, and the report")
    p.add_argument("--data", type=Path, help="the dataset root (default: the grid's data.root); written when missing")
    p.add_argument("--batches", type=int, nargs="+", help="run only these global batches")
    p.add_argument("--optimizers", nargs="+", help="run only these optimizers (the grid's names)")
    p.add_argument("--norms", nargs="+", help="run only these normalizations (the grid's names)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their derived settings; run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild results.json/md and the plots; run nothing")
    p.add_argument("--controller", choices=("gloo", "mpi"), help="horovodrun's (default: its own choice, as make demo)")
    p.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before a cell's launch is killed")
    args = p.parse_args(argv)
    runs_dir = args.runs_dir.resolve()
    args.runs_dir = runs_dir
    try:
        grid = load_grid(args.grid)
        create = not (args.dry_run or args.report_only)
        data_root = (args.data or ROOT / grid.data.root).resolve()
        images = ensure_data(grid, data_root, create=create)
        pretrain = pretrain_cell(grid, runs_dir, create=create)

        def derive() -> list[Cell]:
            return derive_cells(grid, images, data_root, runs_dir, pretrained_checkpoint(pretrain))

        todo = _filter(grid, args)
        cells = derive()
    except (ConfigError, OSError, yaml.YAMLError) as err:
        print(f"study: {err}", file=sys.stderr)
        return 2
    dataset = {"root": str(data_root), "train_images": images, "preset": grid.data.preset}
    if grid.archive and not args.dry_run:
        while restored := restore_cells(derive(), ROOT / grid.archive):  # a restored sweep reveals its dependants
            print(f"study: restored from {grid.archive}: {', '.join(restored)}", flush=True)
    if args.dry_run:
        names = {c.name for c in cells}
        waiting = sorted({f"{s.optimizer}/{s.norm}" for s in cell_specs(grid)[1]
                          if not any(cell_name(b, s, seed) in names for b in s.batches for seed in s.seeds)})
        print(f"study: {len(todo(cells))} of {len(cells)} cells; {grid.ranks} ranks; {images} train images x "
              f"{grid.epochs:g} epochs = {images * grid.epochs:.0f} images a cell (lr x0.1 at epochs "
              f"{grid.step_epochs}), warmup {grid.warmup_epochs:g} epochs (at least {grid.warmup_iters} iterations)"
              + (f"; the cells of {', '.join(waiting)} wait for an anchor sweep or for the failure they control"
                 if waiting else ""))
        print(cells_table(([pretrain] if pretrain else []) + todo(cells), grid.ranks))
        return 0
    code = 0 if args.report_only else run_grid(grid, derive, todo, dataset, args, pretrain)
    paths = publish(grid, args, pretrain, dataset, derive())
    print("study: " + ", ".join(str(p) for p in paths))
    return code


if __name__ == "__main__":
    sys.exit(main())
