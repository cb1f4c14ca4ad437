"""The batch-size study (issue 10): a grid of train.py runs under LargeDet's protocol, resumable,
collected into one table and plots.

    .venv/bin/python benchmarks/study.py                        # the grid of configs/study/study_batch.yaml
    .venv/bin/python benchmarks/study.py --dry-run              # its cells and their derived settings
    .venv/bin/python benchmarks/study.py --batches 16 64 --optimizers sgd pmdlamb --norms local
    .venv/bin/python benchmarks/study.py --report-only          # table and plots from the run dirs

A cell (global batch x optimizer x normalization) is one ``horovodrun -np RANKS python train.py
--config RECIPE key=value ...`` run in ``RUNS/<cell>/`` (its console output in ``train.log``, its
derived settings in ``cell.json``). The protocol, LargeDet's (Sec. 4.1, Table 1):

* every batch trains the same epochs: ``solver.max_epochs`` / ``step_epochs``, which hvdet.plan turns
  into iterations with the global batch (iterations inversely proportional to the batch);
* lr = base_lr x global batch / reference_batch (the linear scaling rule), from each method's base_lr;
* warmup lasts the same epochs at every batch: ``warmup_iters`` = ceil(warmup_epochs x images / batch);
* global batch = images_per_gpu x ranks x backward passes: images_per_gpu stays at the grid's (one BN
  size per norm) and passes make up the batch; AGVM compares one pass's gradients across ranks, so its
  cells take batch / ranks images per rank in one pass (their BN size is then larger; the table says).

Resuming: a cell whose summary.json exists is done and skipped; a cell that diverged is recorded as
"diverged" (the papers' "Failed"), not retried and not tuned; a cell that crashed or was interrupted
has no summary and runs again (its partial directory is moved to ``<cell>.incomplete``). After every
cell, RUNS/results.json, results.md and the plots are rebuilt (benchmarks/study_report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import ROOT
from benchmarks.study_report import LOG_FILE, cells_table, collect, divergence_line, write_report
from hvdet.config import load_config
from hvdet.dataclass_yaml import ConfigError, build
from hvdet.optim.schedules import epochs_to_iters
from hvdet.plan import plan_run

DEFAULT_GRID = ROOT / "configs/study/study_batch.yaml"
CELL_FILE = "cell.json"


@dataclass
class StudyData:
    root: str = "data/synthetic_hard"
    preset: str = "hard"
    train: int = 1024
    val: int = 128
    size: int = 128
    seed: int = 0


@dataclass
class Method:
    base_lr: float = 0.0                  # at reference_batch; scaled linearly with the batch
    overrides: list[str] = field(default_factory=list)


@dataclass
class Norm:
    norm: str = "local"                   # model.norm
    bn_size_images: int | None = None     # cross_gpu: images per BN statistic (None: all ranks)


@dataclass
class Grid:
    recipe: str = "configs/synthetic_demo.yaml"
    ranks: int = 2
    data: StudyData = field(default_factory=StudyData)
    images_per_gpu: int = 8
    reference_batch: int = 16
    epochs: float = 12.0
    step_epochs: list[float] = field(default_factory=list)
    warmup_epochs: float = 1.0
    eval_epochs: float = 1.0
    log_epochs: float = 0.5
    batches: list[int] = field(default_factory=list)
    optimizers: dict = field(default_factory=dict)    # name -> Method
    norms: dict = field(default_factory=dict)         # name -> Norm
    overrides: list[str] = field(default_factory=list)
    cell_overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Cell:
    name: str
    batch: int
    optimizer: str
    norm: str
    images_per_gpu: int
    passes: int
    bn_size: int                          # images per BN statistic
    lr: float                             # peak lr (hvdet.plan)
    max_iters: int
    steps: list[int]
    warmup_iters: int
    eval_interval: int
    output_dir: str
    overrides: list[str]


def load_grid(path: str | Path) -> Grid:
    """The study's grid file, checked like a recipe: unknown keys and wrong types are errors."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    sections = {k: raw.pop(k, None) or {} for k in ("optimizers", "norms")}
    grid = build(Grid, raw, "", str(path))
    grid.optimizers = {n: build(Method, v, f"optimizers.{n}.", str(path)) for n, v in sections["optimizers"].items()}
    grid.norms = {n: build(Norm, v, f"norms.{n}.", str(path)) for n, v in sections["norms"].items()}
    if not (grid.batches and grid.optimizers and grid.norms):
        raise ConfigError(f"{path}: batches, optimizers and norms must each name at least one value")
    if bad := [n for n, m in grid.optimizers.items() if m.base_lr <= 0]:
        raise ConfigError(f"{path}: optimizers {bad} need a base_lr > 0")
    return grid


def _layout(batch: int, ranks: int, images_per_gpu: int, one_pass: bool, name: str) -> tuple[int, int]:
    """(images per rank per pass, backward passes) that make ``batch``."""
    per_step = images_per_gpu * ranks
    if one_pass:  # AGVM: the whole batch in one backward pass
        if batch % ranks:
            raise ConfigError(f"cell {name}: batch {batch} does not split over {ranks} ranks")
        return batch // ranks, 1
    if batch % per_step:
        raise ConfigError(f"cell {name}: batch {batch} is not a multiple of {images_per_gpu} images x {ranks} ranks")
    return images_per_gpu, batch // per_step


def _bn_size(norm: Norm, images_per_gpu: int, ranks: int) -> int:
    """Images per BN statistic: a rank's own for local BN; cross_gpu's wanted size when whole ranks
    make it, else all ranks (an AGVM cell whose rank already holds more images than the size)."""
    if norm.norm != "cross_gpu":
        return images_per_gpu
    wanted = norm.bn_size_images or images_per_gpu * ranks
    fits = wanted % images_per_gpu == 0 and ranks % (wanted // images_per_gpu) == 0
    return wanted if fits else images_per_gpu * ranks


def derive_cells(grid: Grid, dataset_size: int, data_root: Path, runs_dir: Path) -> list[Cell]:
    """Every cell of the grid in order (batch, then optimizer, then norm), with hvdet.plan's numbers."""
    cells = [_cell(grid, b, o, n, dataset_size, data_root, runs_dir)
             for b in grid.batches for o in grid.optimizers for n in grid.norms]
    if unknown := set(grid.cell_overrides) - {c.name for c in cells}:
        raise ConfigError(f"cell_overrides names cells the grid does not have: {sorted(unknown)}")
    return cells


def _cell(grid: Grid, batch: int, optimizer: str, norm_name: str, images: int, data_root: Path,
          runs_dir: Path) -> Cell:
    name, method, norm = f"b{batch}-{optimizer}-{norm_name}", grid.optimizers[optimizer], grid.norms[norm_name]
    recipe = ROOT / grid.recipe
    base = [*grid.overrides, *method.overrides]
    one_pass = load_config(recipe, base).agvm.enabled
    per_gpu, passes = _layout(batch, grid.ranks, grid.images_per_gpu, one_pass, name)
    bn_size = _bn_size(norm, per_gpu, grid.ranks)

    def iters(epochs: float) -> int:  # iterations that cover `epochs` at this batch
        return epochs_to_iters(epochs, images, batch)

    eval_every = max(1, iters(grid.eval_epochs))
    overrides = [*base, f"model.norm={norm.norm}",
                 f"bn.size_images={bn_size if norm.norm == 'cross_gpu' else 'null'}",
                 f"data.root={data_root}", f"data.images_per_gpu={per_gpu}",
                 f"solver.backward_passes_per_step={passes}", "solver.lr_scaling=linear",
                 f"solver.base_lr={method.base_lr}", f"solver.reference_batch={grid.reference_batch}",
                 "solver.max_iters=0", "solver.steps=[]", "solver.iters_at_batch=null", "solver.iterations_scale=1.0",
                 f"solver.max_epochs={grid.epochs}", f"solver.step_epochs={list(grid.step_epochs)}",
                 f"solver.warmup_iters={iters(grid.warmup_epochs)}", f"eval.interval={eval_every}",
                 f"eval.start={eval_every}", f"log.interval={max(1, iters(grid.log_epochs))}",
                 f"output_dir={runs_dir / name}", *grid.cell_overrides.get(name, [])]
    cfg = load_config(recipe, overrides)
    plan = plan_run(cfg, grid.ranks, images)  # the very numbers train.py will use
    return Cell(name, plan.global_batch, optimizer, norm_name, per_gpu, passes, bn_size, plan.lr, plan.max_iters,
                plan.steps, cfg.solver.warmup_iters, cfg.eval.interval, cfg.output_dir, overrides)


# ---------------------------------------------------------------------------------------------
# Data and running
# ---------------------------------------------------------------------------------------------

def ensure_data(grid: Grid, root: Path, create: bool = True) -> int:
    """The train set's image count; writes the grid's synthetic set under ``root`` when missing.
    A dry run (create=False) of a missing set counts what would be written."""
    train_ann = root / "annotations/instances_train.json"
    if not (root / "annotations/instances_val.json").is_file():
        if not create:
            return grid.data.train
        from hvdet.data.synthetic import make_synthetic_coco

        d = grid.data
        print(f"study: writing the {d.preset} synthetic set to {root} ({d.train} train / {d.val} val images of "
              f"{d.size} px, seed {d.seed})", flush=True)
        make_synthetic_coco(root, d.train, d.val, d.size, d.seed, preset=d.preset)
    return len(json.loads(train_ann.read_text())["images"])


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
    start, code = time.perf_counter(), None
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
    _write_json(run_dir / CELL_FILE, {**asdict(cell), "command": cmd, "exit_code": code,
                                      "wall_s": time.perf_counter() - start})
    summary = run_dir / "summary.json"
    if not summary.exists() and (line := divergence_line(run_dir / LOG_FILE)):
        _write_json(summary, {"stop": "diverged", "failure": line, "written_by": "benchmarks/study.py"})


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def run_grid(grid: Grid, cells: list[Cell], todo: list[Cell], dataset: dict, args) -> int:
    """Run the cells of ``todo`` not done yet, one line each, the report rebuilt after each."""
    pending = [c for c in todo if not (Path(c.output_dir) / "summary.json").exists()]
    for c in todo:
        if c not in pending:
            print(f"study: {c.name}: done already (summary.json), skipped", flush=True)
    failed, spent, t0 = 0, [], time.perf_counter()
    for i, cell in enumerate(pending, 1):
        print(f"[{i}/{len(pending)}] {cell.name}: batch {cell.batch} = {cell.images_per_gpu} x {grid.ranks} ranks x "
              f"{cell.passes} passes, lr {cell.lr:.4g}, {cell.max_iters} iterations (warmup {cell.warmup_iters})",
              flush=True)
        start = time.perf_counter()
        run_cell(grid, cell, args.controller, args.cell_timeout)
        spent.append(time.perf_counter() - start)
        row = collect(cell, dataset["train_images"])
        failed += row["status"] == "failed"
        eta = sum(spent) / len(spent) * (len(pending) - i)
        ap = "-" if row["final_ap"] is None else f"{row['final_ap']:.3f}"
        print(f"[{i}/{len(pending)}] {cell.name}: {row['status']}, final AP {ap}, {spent[-1]:.0f} s; "
              f"elapsed {_clock(time.perf_counter() - t0)}, ETA {_clock(eta)}", flush=True)
        write_report(grid_doc(grid, args), cells, dataset, args.runs_dir)
    return 1 if failed else 0


def grid_doc(grid: Grid, args) -> dict:
    path = Path(args.grid).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return {"file": str(shown), "ranks": grid.ranks, "epochs": grid.epochs, "step_epochs": grid.step_epochs,
            "warmup_epochs": grid.warmup_epochs, "reference_batch": grid.reference_batch,
            "base_lr": {n: m.base_lr for n, m in grid.optimizers.items()}, "data": asdict(grid.data)}


def _select(cells: list[Cell], args) -> list[Cell]:
    for key, values, known in (("batches", args.batches, {c.batch for c in cells}),
                               ("optimizers", args.optimizers, {c.optimizer for c in cells}),
                               ("norms", args.norms, {c.norm for c in cells})):
        if values and (unknown := set(values) - known):
            raise ConfigError(f"--{key} {sorted(unknown)} not in the grid (it has {sorted(known)})")
    return [c for c in cells if (not args.batches or c.batch in args.batches)
            and (not args.optimizers or c.optimizer in args.optimizers) and (not args.norms or c.norm in args.norms)]


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
    try:
        grid = load_grid(args.grid)
        data_root = (args.data or ROOT / grid.data.root).resolve()
        images = ensure_data(grid, data_root, create=not (args.dry_run or args.report_only))
        cells = derive_cells(grid, images, data_root, args.runs_dir.resolve())
        todo = _select(cells, args)
    except (ConfigError, OSError, yaml.YAMLError) as err:
        print(f"study: {err}", file=sys.stderr)
        return 2
    dataset = {"root": str(data_root), "train_images": images, "preset": grid.data.preset}
    if args.dry_run:
        print(f"study: {len(todo)} of {len(cells)} cells; {grid.ranks} ranks; {images} train images x {grid.epochs:g} "
              f"epochs = {images * grid.epochs:.0f} images a cell (lr x0.1 at epochs {grid.step_epochs}), warmup "
              f"{grid.warmup_epochs:g} epochs")
        print(cells_table(todo, grid.ranks))
        return 0
    code = 0 if args.report_only else run_grid(grid, cells, todo, dataset, args)
    paths = write_report(grid_doc(grid, args), cells, dataset, args.runs_dir)
    print("study: " + ", ".join(str(p) for p in paths))
    return code


if __name__ == "__main__":
    sys.exit(main())
