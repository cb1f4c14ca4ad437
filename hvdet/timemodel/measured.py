"""A measured step: from a run (``metrics.jsonl`` + ``summary.json``) or a benchmark's JSON, and the
calibration check that predicts an N-rank step from a 1-rank one on the same machine.

A source is named by a string: a run directory, a ``metrics.jsonl`` file, or a JSON file, optionally
with ``#key.key`` to pick a nested object (``results.json#hvdet.2``). A JSON object may give
``world_size`` (or ``ranks``), ``images_per_gpu``, ``arch`` and the step as the run log's per-phase
seconds (``data_s``, ``forward_s``, ``backward_allreduce_s``, ``optimizer_s``), as ``step_s``, or as
``images_per_s`` (all ranks together). Without ``world_size``, a last key ending in ``-N`` gives it, as
benchmarks/ddp_baseline.py names its settings (``ddp_baseline.json#results.hvdet-horovodrun-2``: 2).
A run's step is the sum of the four phases' medians over its ``train`` records, the first left out
(its window holds the warm-up).
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from hvdet.timemodel.model import Horovod, System, Workload, scale_images, step

PHASES = ("data_s", "forward_s", "backward_allreduce_s", "optimizer_s")


@dataclass(frozen=True)
class Measured:
    world_size: int | None
    images_per_gpu: int | None
    step_s: float
    backward_s: float | None  # backward_allreduce_s: backward alone on one rank
    arch: str | None
    source: str


def _from_record(rec: dict, source: str) -> Measured:
    suffix = re.search(r"-(\d+)$", source.rpartition("#")[2].rpartition(".")[2]) if "#" in source else None
    world = rec.get("world_size", rec.get("ranks", int(suffix.group(1)) if suffix else None))
    ipg = rec.get("images_per_gpu")
    if all(k in rec for k in PHASES):
        step_s, backward = sum(float(rec[k]) for k in PHASES), float(rec["backward_allreduce_s"])
    elif "step_s" in rec:
        step_s, backward = float(rec["step_s"]), None
    elif "images_per_s" in rec and world and ipg:
        step_s, backward = world * ipg / float(rec["images_per_s"]), None
    else:
        raise ValueError(f"{source}: no step in it: give the phases {PHASES}, step_s, or images_per_s with "
                         f"world_size and images_per_gpu")
    return Measured(int(world) if world else None, int(ipg) if ipg else None, step_s, backward,
                    rec.get("arch"), source)


def _from_run(path: Path) -> Measured:
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [r for r in lines if r.get("type") == "train" and all(r.get(k) is not None for k in PHASES)]
    train = train[1:] if len(train) > 1 else train
    if not train:
        raise ValueError(f"{metrics}: no train records with the phases {PHASES}")
    rec = {k: statistics.median(r[k] for r in train) for k in PHASES}
    summary = metrics.parent / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        rec.update({k: s[k] for k in ("world_size", "images_per_gpu", "arch") if k in s})
    return _from_record(rec, str(metrics))


def load(spec: str) -> Measured:
    """The measured step named by ``spec`` (see the module docstring)."""
    name, _, key = spec.partition("#")
    path = Path(name)
    if path.is_dir() or path.suffix == ".jsonl":
        return _from_run(path)
    obj = json.loads(path.read_text())
    for part in filter(None, key.split(".")):
        obj = obj[part]
    return _from_record(obj, spec)


@dataclass(frozen=True)
class Calibration:
    ranks: int
    compute_s: float  # the 1-rank step
    cgbn_s: float
    exposed_s: float
    predicted_s: float
    measured_s: float

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


def calibrate(one: Measured, many: Measured, system: System, horovod: Horovod, params: float,
              bn_layers: int = 0, bn_collectives: int = 3, bn_group: int | None = None) -> Calibration:
    """Predict ``many``'s step from ``one`` (a 1-rank run of the same recipe): its step is the compute,
    its ``backward_allreduce_s`` the backward; CGBN's group defaults to all ranks."""
    if one.world_size not in (None, 1):
        raise ValueError(f"{one.source}: the reference must be a 1-rank run, it has {one.world_size} ranks")
    ranks = many.world_size
    if not ranks:
        raise ValueError(f"{many.source}: its world_size is unknown")
    backward = one.backward_s if one.backward_s is not None else 2 / 3 * one.step_s
    w = Workload(params, one.step_s, backward, images_per_gpu=one.images_per_gpu or 1, bn_layers=bn_layers,
                 bn_collectives=bn_collectives, bn_group=bn_group or ranks)
    if many.images_per_gpu and one.images_per_gpu:
        w = scale_images(w, many.images_per_gpu)
    s = step(w, ranks, system, horovod)
    return Calibration(ranks, s.compute_s, s.cgbn_s, s.exposed_s, s.step_s, many.step_s)
