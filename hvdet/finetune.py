"""Fine-tuning from any checkpoint (``model.init_from``): a trained detector's weights in a new one.

    report = init_from(model, "runs/coco", skip=["roi_heads.box_predictor.*"])
    print(report.line())

The file is an hvdet checkpoint (or a run's ``output_dir``: its newest checkpoint) or a torchvision
detector state dict (``torch.save(fasterrcnn_resnet50_fpn(...).state_dict(), path)``, or one under a
``"model"`` key; ``module.`` prefixes are stripped). It is read with ``torch.load(weights_only=True)``
(:func:`hvdet.checkpoint.read_weights_only`): no code in it runs. Each of the model's state-dict
tensors (parameters and buffers) is, in this order:

* **skipped**: its name matches a ``skip`` pattern (``fnmatch``): left at its fresh initialization;
* **missing**: the file has no tensor of that name: fresh;
* **reinitialized**: the file's tensor has another shape: fresh. These are the class-dependent heads
  when the class count changes: ``roi_heads.box_predictor.{cls_score,bbox_pred}``,
  ``roi_heads.mask_predictor.mask_fcn_logits``, RetinaNet's ``head.classification_head.cls_logits``;
  or, from a torchvision full-size file into a ``_fast`` model, everything outside the ResNet body;
* **loaded**: copied from the file.

**Unexpected** lists the file's tensors the model has no name for (a Mask R-CNN file's mask head for a
Faster R-CNN). BN's ``num_batches_tracked`` counters load where both sides have one and are otherwise
left out of the lists (FrozenBatchNorm2d has none, BatchNorm2d does: neither changes what a model computes).

A file of which nothing loads (a ResNet-only state dict, another architecture) is an error: that is
``model.pretrained_backbone``'s job, or a mistake. A ``skip`` pattern that matches no tensor is an
error too (a typo would otherwise silently load the head it meant to skip).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hvdet import checkpoint
from hvdet.checkpoint import CheckpointError

SHOWN_NAMES = 4  # names per category in the printed line; the metrics record lists them all


@dataclass
class InitReport:
    """What :func:`init_from` did with each tensor (state-dict names)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)        # matched a model.init_skip pattern
    reinitialized: list[str] = field(default_factory=list)  # the file's shape differs from the model's
    missing: list[str] = field(default_factory=list)        # not in the file
    unexpected: list[str] = field(default_factory=list)     # in the file, not in the model

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("loaded", "skipped", "reinitialized", "missing", "unexpected")}

    def record(self) -> dict:
        """The metrics.jsonl record (type ``init_from``): the counts and every name but the loaded ones
        (all the model's tensors that are in no other list)."""
        return {"iteration": 0, "path": self.path, "counts": self.counts(), "skipped": self.skipped,
                "reinitialized": self.reinitialized, "missing": self.missing, "unexpected": self.unexpected}

    def line(self) -> str:
        """One line for the console: the counts, and the first names of each category but loaded."""
        def names(kind: str) -> str:
            found = getattr(self, kind)
            if not found:
                return ""
            more = f", +{len(found) - SHOWN_NAMES} more" if len(found) > SHOWN_NAMES else ""
            return f" ({', '.join(found[:SHOWN_NAMES])}{more})"

        c = self.counts()
        return (f"model.init_from {self.path}: {c['loaded']} tensors loaded, {c['skipped']} skipped by "
                f"model.init_skip{names('skipped')}, {c['reinitialized']} reinitialized (shape differs)"
                f"{names('reinitialized')}, {c['missing']} missing from the file{names('missing')}, "
                f"{c['unexpected']} unexpected (not in the model){names('unexpected')}")


def read(path: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor]]:
    """The checkpoint file ``path`` names (a run's ``output_dir``: its newest) and its model weights.
    Every problem is a one-line :class:`CheckpointError` naming the file."""
    try:
        file = checkpoint.resolve(path)
        weights, _ = checkpoint.model_and_config(file, weights_only=True)
    except CheckpointError as err:
        raise CheckpointError(f"model.init_from: {err}") from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"model.init_from: {file} holds no state dict of tensors under 'model'")
    return file, {k.removeprefix("module."): v for k, v in weights.items()}


def load_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str | os.PathLike,
              skip: list[str] | tuple[str, ...] = ()) -> InitReport:
    """Copy ``weights`` (read from ``source``) into ``model`` where names and shapes agree, except the
    names that match a ``skip`` pattern; the other tensors keep their values. Returns the report."""
    mine = model.state_dict()
    unused = [p for p in skip if not any(fnmatch.fnmatchcase(name, p) for name in mine)]
    if unused:
        raise CheckpointError(f"model.init_skip pattern {unused[0]!r} matches no tensor of the model "
                              f"(names look like {next(iter(mine))!r}); fix or remove it")
    report = InitReport(str(source))
    counter = "num_batches_tracked"  # BN's step counter: FrozenBatchNorm2d has none (see the module doc)
    for name, tensor in mine.items():
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            report.skipped.append(name)
        elif name not in weights:
            if not name.endswith(counter):
                report.missing.append(name)
        elif weights[name].shape != tensor.shape:
            report.reinitialized.append(name)
        else:
            report.loaded.append(name)
    report.unexpected = [k for k in weights if k not in mine and not k.endswith(counter)]
    if not [k for k in report.loaded if not k.endswith(counter)]:
        example = next(iter(weights), "nothing")
        raise CheckpointError(
            f"model.init_from {source}: none of its {len(weights)} tensors fits this model (by name and shape; "
            f"the file's first is {example!r}): for a ResNet backbone state dict use model.pretrained_backbone")
    # Copied into the model's own tensors (device, dtype and memory format stay); the rest keep theirs.
    model.load_state_dict({name: weights[name] for name in report.loaded}, strict=False)
    return report


def init_from(model: nn.Module, path: str | os.PathLike, skip: list[str] | tuple[str, ...] = ()) -> InitReport:
    """:func:`read` then :func:`load_into`."""
    file, weights = read(path)
    return load_into(model, weights, file, skip)
