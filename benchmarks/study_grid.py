"""The batch-size study's grid: its file format, and the cells it derives (benchmarks/study.py runs them).

The protocol (LargeDet's, Sec. 4.1, Tables 1-2; docs/study.md):

* every batch trains the same epochs: ``solver.max_epochs`` / ``step_epochs``, which hvdet.plan turns
  into iterations with the global batch (iterations inversely proportional to the batch);
* lr = base_lr x global batch / reference_batch (the linear scaling rule), from each method's base_lr,
  or from the winner of an anchor sweep at the reference batch (the protocol's only tuning);
* warmup: ``warmup_epochs`` at every batch, at least ``warmup_iters`` iterations (hvdet.plan);
* global batch = images_per_gpu x ranks x backward passes: images_per_gpu stays at the grid's (one BN
  size per norm) and passes make up the batch; AGVM compares one pass's gradients across ranks, so its
  cells (and a spec with ``one_pass``) take batch / ranks images per rank in one pass;
* cells are the product batches x optimizers x norms, or listed one by one (``cells:``: controls with
  a tag, seeds); a ``pretrain:`` section makes the starting point every cell loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.provenance import ROOT
from benchmarks.study_report import collect
from hvdet.config import load_config
from hvdet.dataclass_yaml import ConfigError, build
from hvdet.optim.schedules import epochs_to_iters
from hvdet.plan import plan_run

DEFAULT_GRID = ROOT / "configs/study/study_large_batch.yaml"
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
    base_lr: float = 0.0                  # at reference_batch; scaled by the recipe's rule (linear) with the batch
    anchor: str | None = None             # instead of base_lr: the winner of anchor_sweeps[anchor]
    overrides: list[str] = field(default_factory=list)


@dataclass
class Pretrain:
    """The pretrained starting point, made once (as ImageNet weights are for COCO): the recipe trained on
    another seed of the synthetic data at a small batch; cells load its backbone body."""
    data_root: str = "data/synthetic_hard64_pretrain"
    data_seed: int = 1
    batch: int = 16
    epochs: float = 4.0
    overrides: list[str] = field(default_factory=list)


@dataclass
class CellSpec:
    """Cells given one by one (``cells:``), instead of the product of batches x optimizers x norms."""
    optimizer: str = ""                   # a key of optimizers
    norm: str = ""                        # a key of norms
    batches: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    tag: str = ""                         # names the variant: b512-pmdlamb-cross_gpu-sqrt
    base_lr: float | None = None          # instead of the method's (the anchor sweeps' cells)
    one_pass: bool = False                # the whole batch in one backward pass (AGVM and its control)
    images_per_gpu: int | None = None     # per pass, instead of the grid's (BN size of local BN)
    at_first_failure: bool = False        # batches: the first batch where the optimizer's plain cells (same
    #   norm, no tag, seed 0) fail: diverge, or lose more than failure_loss against the reference batch
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
    warmup_iters: int = 0                 # a floor in iterations: the warmup is the longer of the two
    eval_epochs: float = 1.0
    log_epochs: float = 0.5
    batches: list[int] = field(default_factory=list)
    optimizers: dict = field(default_factory=dict)    # name -> Method
    norms: dict = field(default_factory=dict)         # name -> Norm
    overrides: list[str] = field(default_factory=list)
    cell_overrides: dict[str, list[str]] = field(default_factory=dict)
    pretrain: Pretrain | None = None
    anchor_sweeps: dict[str, list[float]] = field(default_factory=dict)  # method -> base lrs tried at reference_batch
    anchor_norm: str = ""                 # the norm of the sweeps' cells
    cells: list[CellSpec] = field(default_factory=list)
    failure_loss: float = 0.05            # relative AP loss against the reference batch that counts as failing
    archive: str = ""                     # the committed copy (results and each finished cell's small files);
    #   a new checkout restores finished cells from it instead of running them again


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
    seed: int = 0
    tag: str = ""
    base_lr: float = 0.0
    label: str = ""                       # the line a cell belongs to in the plots (optimizer[+tag])


def load_grid(path: str | Path) -> Grid:
    """The study's grid file, checked like a recipe: unknown keys and wrong types are errors."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    sections = {k: raw.pop(k, None) or {} for k in ("optimizers", "norms")}
    pretrain, specs = raw.pop("pretrain", None), raw.pop("cells", None) or []
    grid = build(Grid, raw, "", str(path))
    grid.optimizers = {n: build(Method, v, f"optimizers.{n}.", str(path)) for n, v in sections["optimizers"].items()}
    grid.norms = {n: build(Norm, v, f"norms.{n}.", str(path)) for n, v in sections["norms"].items()}
    grid.pretrain = None if pretrain is None else build(Pretrain, pretrain, "pretrain.", str(path))
    if not isinstance(specs, list):
        raise ConfigError(f"{path}: cells must be a list of cell specs")
    grid.cells = [build(CellSpec, v, f"cells[{i}].", str(path)) for i, v in enumerate(specs)]
    if not ((grid.batches or grid.cells) and grid.optimizers and grid.norms):
        raise ConfigError(f"{path}: optimizers, norms and batches (or cells) must each name at least one value")
    for i, spec in enumerate(grid.cells):
        if spec.optimizer not in grid.optimizers or spec.norm not in grid.norms or not (spec.batches or
                                                                                       spec.at_first_failure):
            raise ConfigError(f"{path}: cells[{i}] needs an optimizer of {sorted(grid.optimizers)}, a norm of "
                              f"{sorted(grid.norms)} and batches; got {spec.optimizer!r}, {spec.norm!r}, "
                              f"{spec.batches}")
    for name, m in grid.optimizers.items():
        if m.anchor is not None and m.anchor not in grid.anchor_sweeps:
            raise ConfigError(f"{path}: optimizers.{name}.anchor {m.anchor!r} is not a key of anchor_sweeps")
        if m.anchor is None and m.base_lr <= 0:
            raise ConfigError(f"{path}: optimizers {[name]} need a base_lr > 0 (or an anchor)")
    if bad := [n for n in grid.anchor_sweeps if n not in grid.optimizers]:
        raise ConfigError(f"{path}: anchor_sweeps names optimizers the grid does not have: {bad}")
    if grid.anchor_sweeps and grid.anchor_norm not in grid.norms:
        raise ConfigError(f"{path}: anchor_norm must be one of {sorted(grid.norms)}, got {grid.anchor_norm!r}")
    return grid


def cell_specs(grid: Grid) -> tuple[list[CellSpec], list[CellSpec]]:
    """Every cell's spec in run order: the anchor sweeps' (their winners set other cells' lr), then
    the ``cells`` list, or the product batches x optimizers x norms when there is none."""
    sweeps = [CellSpec(o, grid.anchor_norm, [grid.reference_batch], tag=f"lr{lr:g}", base_lr=lr)
              for o, lrs in grid.anchor_sweeps.items() for lr in lrs]
    product = [CellSpec(o, n, [b]) for b in grid.batches for o in grid.optimizers for n in grid.norms]
    return sweeps, grid.cells or product


def cell_name(batch: int, spec: CellSpec, seed: int) -> str:
    return (f"b{batch}-{spec.optimizer}-{spec.norm}" + (f"-{spec.tag}" if spec.tag else "")
            + (f"-s{seed}" if seed else ""))


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


def derive_cells(grid: Grid, dataset_size: int, data_root: Path, runs_dir: Path,
                 pretrained: str | None = None) -> list[Cell]:
    """Every cell of the grid in order, with hvdet.plan's numbers. A cell whose lr is an anchor sweep's
    winner is left out until every cell of that sweep has finished (:func:`anchors`)."""
    sweep_cells, cells, won = [], [], {}
    sweeps, specs = cell_specs(grid)
    for spec in sweeps + specs:
        if spec.base_lr is None and (anchor := grid.optimizers[spec.optimizer].anchor) is not None:
            if anchor not in won:
                won.update(anchors(grid, sweep_cells, dataset_size))
            lr = won.get(anchor)
            if lr is None:
                continue  # waiting for its sweep
        else:
            lr = spec.base_lr if spec.base_lr is not None else grid.optimizers[spec.optimizer].base_lr
        batches = spec.batches
        if spec.at_first_failure:
            batches = first_failure(grid, spec, cells, dataset_size)
        for batch in batches:
            for seed in spec.seeds:
                cell = _cell(grid, batch, spec, seed, lr, dataset_size, data_root, runs_dir, pretrained)
                (sweep_cells if any(spec is w for w in sweeps) else cells).append(cell)
    for cell in sweep_cells:  # a sweep's winner is its optimizer's point at the reference batch in the plots
        if won.get(cell.optimizer) == cell.base_lr:
            cell.label = cell.optimizer
    everything = sweep_cells + cells
    if len({c.name for c in everything}) < len(everything):
        raise ConfigError("two cells of the grid have the same name; give one a tag")
    if unknown := set(grid.cell_overrides) - {c.name for c in everything}:
        raise ConfigError(f"cell_overrides names cells the grid does not have: {sorted(unknown)}")
    return everything


def first_failure(grid: Grid, spec: CellSpec, cells: list[Cell], dataset_size: int) -> list[int]:
    """[the smallest batch at which ``spec``'s optimizer failed], or [] while its plain cells are not all
    finished or when none failed (then the control is not needed). Failing: diverged, or a final AP
    more than ``grid.failure_loss`` (relative) below the reference batch's."""
    plain = sorted((c for c in cells if c.optimizer == spec.optimizer and c.norm == spec.norm and not c.tag
                    and c.seed == 0), key=lambda c: c.batch)
    rows = [collect(c, dataset_size) for c in plain]
    if not rows or any(r["status"] not in ("max_iters", "target", "diverged") for r in rows):
        return []
    reference = next((r["final_ap"] for r in rows if r["batch"] == grid.reference_batch), None)
    for r in rows:
        if r["batch"] > grid.reference_batch and (r["status"] == "diverged" or reference is not None and (
                r["final_ap"] is None or r["final_ap"] < reference * (1 - grid.failure_loss))):
            return [r["batch"]]
    return []


def anchors(grid: Grid, sweep_cells: list[Cell], dataset_size: int) -> dict[str, float]:
    """{optimizer: its anchor lr} for every sweep whose cells have all finished: the base lr with the
    best final AP at the reference batch (seed 0; a tie goes to the smaller lr). The protocol's only
    tuning: every other batch takes the winner, scaled by the rule (LargeDet: "anchor lr at batch 16")."""
    won = {}
    for optimizer in grid.anchor_sweeps:
        rows = [(c.base_lr, collect(c, dataset_size)) for c in sweep_cells if c.optimizer == optimizer]
        if rows and all(r["status"] in ("max_iters", "target", "diverged") for _, r in rows):
            finished = [(r["final_ap"], -lr, lr) for lr, r in rows if r["final_ap"] is not None]
            if finished:
                won[optimizer] = max(finished)[2]
    return won


def _cell(grid: Grid, batch: int, spec: CellSpec, seed: int, base_lr: float, images: int, data_root: Path,
          runs_dir: Path, pretrained: str | None) -> Cell:
    name, method, norm = cell_name(batch, spec, seed), grid.optimizers[spec.optimizer], grid.norms[spec.norm]
    recipe = ROOT / grid.recipe
    start = [f"model.pretrained_backbone={pretrained}"] if pretrained else []
    base = [*start, *grid.overrides, *method.overrides, *spec.overrides]
    one_pass = spec.one_pass or load_config(recipe, base).agvm.enabled
    per_gpu, passes = _layout(batch, grid.ranks, spec.images_per_gpu or grid.images_per_gpu, one_pass, name)
    bn_size = _bn_size(norm, per_gpu, grid.ranks)

    def iters(epochs: float) -> int:  # iterations that cover `epochs` at this batch
        return epochs_to_iters(epochs, images, batch)

    eval_every = max(1, iters(grid.eval_epochs))
    overrides = [*base, f"model.norm={norm.norm}",
                 f"bn.size_images={bn_size if norm.norm == 'cross_gpu' else 'null'}",
                 f"data.root={data_root}", f"data.images_per_gpu={per_gpu}",
                 f"solver.backward_passes_per_step={passes}", "solver.lr_scaling=linear",
                 "solver.iterations_scale=1.0", f"solver.base_lr={base_lr}",
                 f"solver.reference_batch={grid.reference_batch}",
                 "solver.max_iters=0", "solver.steps=[]", "solver.iters_at_batch=null",
                 f"solver.max_epochs={grid.epochs}", f"solver.step_epochs={list(grid.step_epochs)}",
                 f"solver.warmup_iters={grid.warmup_iters}", f"solver.warmup_epochs={grid.warmup_epochs}",
                 f"eval.interval={eval_every}", f"eval.start={eval_every}",
                 f"log.interval={max(1, iters(grid.log_epochs))}",
                 f"seed={seed}", f"output_dir={runs_dir / name}", *grid.cell_overrides.get(name, [])]
    # The spec's own overrides win over the grid's (a control's lr rule, schedule length or start).
    overrides += [o for o in spec.overrides if o.split("=", 1)[0] in _CONTROLLED]
    cfg = load_config(recipe, overrides)
    plan = plan_run(cfg, grid.ranks, images)  # the very numbers train.py will use
    label = spec.optimizer + (f"+{spec.tag}" if spec.tag else "")
    return Cell(name, plan.global_batch, spec.optimizer, spec.norm, per_gpu, passes, bn_size, plan.lr, plan.max_iters,
                plan.steps, plan.warmup_iters, cfg.eval.interval, cfg.output_dir, overrides, seed, spec.tag,
                cfg.solver.base_lr, label)


# Keys the grid sets for every cell that a spec's overrides may still change (its controls).
_CONTROLLED = ("solver.lr_scaling", "solver.iterations_scale", "solver.warmup_iters", "solver.warmup_epochs",
               "solver.base_lr", "model.pretrained_backbone")


# ---------------------------------------------------------------------------------------------
# Data and the pretrained start
# ---------------------------------------------------------------------------------------------

def ensure_data(grid: Grid, root: Path, create: bool = True, seed: int | None = None) -> int:
    """The train set's image count; writes the grid's synthetic set under ``root`` when missing (with
    ``seed``: another draw of it, the pretraining set). A dry run (create=False) of a missing set
    counts what would be written."""
    train_ann = root / "annotations/instances_train.json"
    if not (root / "annotations/instances_val.json").is_file():
        if not create:
            return grid.data.train
        from hvdet.data.synthetic import make_synthetic_coco

        d = grid.data
        seed = d.seed if seed is None else seed
        print(f"study: writing the {d.preset} synthetic set to {root} ({d.train} train / {d.val} val images of "
              f"{d.size} px, seed {seed})", flush=True)
        make_synthetic_coco(root, d.train, d.val, d.size, seed, preset=d.preset)
    return len(json.loads(train_ann.read_text())["images"])


def pretrain_cell(grid: Grid, runs_dir: Path, create: bool = True) -> Cell | None:
    """The run that makes the pretrained starting point (``pretrain:``), or None without one. Its
    data is another seed of the grid's set; its checkpoint is :func:`pretrained_checkpoint`."""
    p = grid.pretrain
    if p is None:
        return None
    root = (ROOT / p.data_root).resolve()
    images = ensure_data(grid, root, create, seed=p.data_seed)
    if p.batch % grid.ranks:
        raise ConfigError(f"pretrain.batch {p.batch} does not split over {grid.ranks} ranks")
    overrides = [*grid.overrides, *p.overrides, f"data.root={root}", f"data.images_per_gpu={p.batch // grid.ranks}",
                 "solver.backward_passes_per_step=1", "solver.max_iters=0", "solver.steps=[]",
                 "solver.iters_at_batch=null", f"solver.max_epochs={p.epochs}", "solver.step_epochs=[]",
                 "eval.interval=0", "checkpoint.interval=0", "checkpoint.keep_last=1",
                 f"output_dir={runs_dir / 'pretrain'}"]
    cfg = load_config(ROOT / grid.recipe, overrides)
    plan = plan_run(cfg, grid.ranks, images)
    return Cell("pretrain", plan.global_batch, cfg.solver.optimizer, cfg.model.norm, p.batch // grid.ranks, 1,
                p.batch, plan.lr, plan.max_iters, plan.steps, plan.warmup_iters, 0, cfg.output_dir, overrides,
                cfg.seed, "pretrain", cfg.solver.base_lr, "pretrain")


def pretrained_checkpoint(cell: Cell | None) -> str | None:
    """The pretraining run's final checkpoint (what the cells' ``model.pretrained_backbone`` loads)."""
    if cell is None:
        return None
    return str(Path(cell.output_dir) / "checkpoints" / "last.pt")
