"""The named parts a recipe chooses from: one table per kind, torch-free.

``hvdet.config`` validates a recipe against these tables without importing torch, and the builders
look the same names up here, so the allowed values and the implementations cannot drift apart.
Adding an optimizer, a dataset format or a group backend is one line in a table below; the recipe
key accepts it at once.

A table maps a name to ``"module:attribute"``, imported on first use (:meth:`Registry.load`), or to
plain data (architectures: :class:`Arch`).
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


class Registry(Mapping):
    """Names -> entries for the recipe key ``key``; unknown names get an error naming the closest."""

    def __init__(self, key: str, entries: dict):
        self.key, self._entries = key, dict(entries)

    def __getitem__(self, name: str):
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{self.key} must be one of {', '.join(self._entries)}, got {name!r}{hint}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, name: str):
        """The object that ``name``'s ``"module:attribute"`` entry points to (imported now)."""
        module, _, attr = self[name].partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Arch:
    family: str         # a FAMILIES name: which builder makes the detector
    backbone: str       # a torchvision ResNet / ResNeXt constructor name
    fast: bool = False  # the CPU variant (hvdet.models.design.FastDesign)
    image_px: int = 128  # the fast variant's image size: its FastDesign (hvdet.models.design.FAST_DESIGNS)

    @property
    def mask(self) -> bool:
        """The detector predicts instance masks (segm evaluation, masks in the training targets)."""
        return self.family == "maskrcnn"


# Detector families (hvdet.models.family.Family: a builder and a module map): a new one (FCOS, a
# transformer backbone) is a Family and one line here, and its architectures are lines in ARCHS.
FAMILIES = Registry("model family", {
    "fasterrcnn": "hvdet.models.rcnn:FAMILY",
    "maskrcnn": "hvdet.models.rcnn:FAMILY",
    "retinanet": "hvdet.models.retinanet:FAMILY",
})

ARCHS = Registry("model.arch", {
    "fasterrcnn_resnet50_fpn": Arch("fasterrcnn", "resnet50"),
    "fasterrcnn_resnet101_fpn": Arch("fasterrcnn", "resnet101"),
    "maskrcnn_resnet50_fpn": Arch("maskrcnn", "resnet50"),
    "maskrcnn_resnet101_fpn": Arch("maskrcnn", "resnet101"),
    "fasterrcnn_resnet18_fpn_fast": Arch("fasterrcnn", "resnet18", fast=True),
    "fasterrcnn_resnet18_fpn_fast64": Arch("fasterrcnn", "resnet18", fast=True, image_px=64),  # the study's
    "maskrcnn_resnet18_fpn_fast": Arch("maskrcnn", "resnet18", fast=True),
    "retinanet_resnet50_fpn": Arch("retinanet", "resnet50"),
    "retinanet_resnext50_32x4d_fpn": Arch("retinanet", "resnext50_32x4d"),  # MLPerf Training's RetinaNet
    "retinanet_resnet18_fpn_fast": Arch("retinanet", "resnet18", fast=True),
})

# Normalization layers of the backbone (hvdet.models): MegDet 3.3.
NORMS = Registry("model.norm", {
    "frozen": "torchvision.ops:FrozenBatchNorm2d",
    "local": "torch.nn:BatchNorm2d",
    "cross_gpu": "hvdet.nn:CrossGPUBatchNorm2d",
})

# Optimizer classes (hvdet.optim.build passes each the recipe's hyperparameters its constructor takes,
# plus solver.optimizer_args). adamw is a function: it picks PyTorch's fused kernel where it can.
OPTIMIZERS = Registry("solver.optimizer", {
    "sgd": "torch.optim:SGD",
    "adam": "torch.optim:Adam",  # MLPerf's RetinaNet (weight decay 0)
    "adamw": "hvdet.optim.build:adamw",
    "lamb": "hvdet.optim.lamb:LAMB",
    "pmdlamb": "hvdet.optim.lamb:PMDLAMB",
    "lars": "hvdet.optim.lars:LARS",
})

# Collectives over groups of consecutive ranks (hvdet.comm.groups), one module each.
GROUP_BACKENDS = Registry("bn.backend", {
    "horovod": "hvdet.comm.horovod_group:HorovodBackend",
    "torch": "hvdet.comm.torch_group:TorchBackend",
    "mpi": "hvdet.comm.mpi_group:MPIBackend",
    "shm": "hvdet.comm.shm:ShmBackend",
})

# Dataset formats (hvdet.data.protocol.DetectionDataset); the synthetic set is written as COCO files.
DATASETS = Registry("data.format", {
    "coco": "hvdet.data.coco:CocoDetection",
    "voc": "hvdet.data.voc:VOCDetection",  # Pascal VOC XML; train_ann / val_ann: ImageSets/Main/<split>.txt
    "lvis": "hvdet.data.lvis:LVISDetection",  # LVIS v1 JSON; train_images / val_images: the COCO image root
})

# Training augmentations (hvdet.data.transforms): multi-scale resize + flip, or large-scale jitter.
AUGMENTATIONS = ("standard", "lsj")

# Cross-GPU BN's statistics and its local arithmetic (hvdet.nn.cross_gpu_bn, hvdet.ops.bn).
BN_STATS = ("auto", "chan", "two_pass", "one_pass")
BN_IMPLS = ("auto", "reference", "triton")
