"""The backbone (ResNet + FPN) in CUDA graphs, one per input shape: ``solver.cuda_graphs``.

Why: on a GPU, a training step of small layers is bound by the host's launches, not by the device.
On the H200 of 2026-12-04 (benchmarks/results/gpu_check.json, ``graphs``) the R50-FPN backbone step
with Cross-GPU BN took 60.6 ms eager and 23.6 ms as a CUDA graph (cuDNN BN: 27.1 ms eager,
24.8 ms graphed): Cross-GPU BN's kernels are as fast as cuDNN's, its Python and launches were not.
A graph replays every kernel of the forward (and, in autograd, of the backward) with one launch.

What is captured: the detector's ``backbone`` (body and FPN), whose shapes are fixed for a given
batch tensor. The heads are not: proposals, NMS and sampling have data-dependent sizes. Each new
(shape, dtype, strides, autocast) of the batch tensor gets its own graph pair from
``torch.cuda.make_graphed_callables`` (its three warm-up steps run eagerly first; the BN running
statistics they move are put back, so the run's statistics are those of the eager model), up to
``max_shapes`` graphs; later new shapes run eagerly, with one warning. A fixed input size
(``data.augmentation: lsj``, whose batches are all ``max_size`` squares) needs one graph.

What a graph needs (checked by :mod:`hvdet.config_checks` and here):

* a CUDA device; training mode with gradients on (evaluation runs the eager forward);
* one backward pass per optimizer step: the graph's backward writes its gradients into the same
  static buffers every time, and autograd may keep the first pass's as ``.grad`` (a second pass
  would overwrite what it should add to);
* BatchNorm layers with a momentum: ``momentum=None`` (a cumulative average) reads the batch count
  on the host every training forward, a sync that a capture cannot contain;
* autocast without its weight cache (``torch.autocast(..., cache_enabled=False)``, what
  :func:`hvdet.step.train_step` uses when this is on);
* Cross-GPU BN's group collectives inside the graph: a group of more than one rank needs a
  capturable collective, torch.distributed's NCCL (``bn.backend: torch``); Horovod's and MPI's run
  on the host and cannot be captured. Every rank of a group must capture, and replay, the same
  shapes in the same order, so such groups need a fixed input size (``data.augmentation: lsj``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


class _Eager(nn.Module):
    """The backbone's own forward, as a module whose parameters are the backbone's: what
    ``make_graphed_callables`` captures (one per shape; they share the backbone)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor):
        return type(self.backbone).forward(self.backbone, x)  # the class's, not the graphed instance attribute


class GraphedForward:
    """``backbone.forward`` replaced by this: replay the graph of the input's shape (captured the first
    time), or run eagerly (CPU tensors, evaluation, no grad, or ``max_shapes`` graphs already made)."""

    def __init__(self, backbone: nn.Module, max_shapes: int = 8):
        self.backbone = backbone
        self.max_shapes = max_shapes
        self.graphs: dict[tuple, nn.Module] = {}
        self._warned = False

    def __call__(self, x: torch.Tensor):
        eager = type(self.backbone).forward
        if not (x.is_cuda and self.backbone.training and torch.is_grad_enabled()):
            return eager(self.backbone, x)
        key = (tuple(x.shape), tuple(x.stride()), x.dtype, torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"))
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_shapes:
                if not self._warned:
                    warnings.warn(f"solver.cuda_graphs: {self.max_shapes} input shapes captured already; "
                                  f"{tuple(x.shape)} and later new shapes run eagerly (a fixed input size, "
                                  "data.augmentation: lsj, needs one graph)", stacklevel=2)
                    self._warned = True
                return eager(self.backbone, x)
            graphed = self.graphs[key] = capture(self.backbone, x)
        return graphed(x)


def capture(backbone: nn.Module, x: torch.Tensor) -> nn.Module:
    """``backbone``'s forward and backward on inputs like ``x`` as a graphed module. Its warm-up
    steps' effect on the buffers (BN running statistics, batch counters) is undone."""
    check_capturable(backbone)
    saved = [b.detach().clone() for b in backbone.buffers()]
    # A fresh wrapper each time: make_graphed_callables replaces the module's own forward with the graph.
    graphed = torch.cuda.make_graphed_callables(_Eager(backbone), (x.detach().clone(),), allow_unused_input=True)
    with torch.no_grad():
        for b, s in zip(backbone.buffers(), saved, strict=True):
            b.copy_(s)
    return graphed


def check_capturable(backbone: nn.Module) -> None:
    """What would break a capture, as a RuntimeError naming the layer: a training BatchNorm with
    ``momentum=None`` (its factor 1/t is read on the host), a Cross-GPU BN group of more than one rank
    on a collective other than torch.distributed's NCCL."""
    from hvdet.nn import CrossGPUBatchNorm2d

    for name, m in backbone.named_modules():
        if not (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training):
            continue
        if m.momentum is None and m.track_running_stats:
            raise RuntimeError(f"solver.cuda_graphs: BatchNorm layer {name!r} has momentum=None (a cumulative "
                               "average, whose factor is read on the host every step), which a CUDA graph cannot "
                               "capture: give it a momentum")
        if isinstance(m, CrossGPUBatchNorm2d) and (group := m._group()).size > 1:
            backend = group.resolve_backend(torch.device("cuda"), m.backend)
            if backend != "torch":
                raise RuntimeError(f"solver.cuda_graphs: Cross-GPU BN layer {name!r} (a group of {group.size} "
                                   f"ranks) communicates by {backend!r}, which a CUDA graph cannot capture: "
                                   "set bn.backend: torch (NCCL)")


def graph_backbone(model: nn.Module, max_shapes: int = 8) -> nn.Module:
    """Give ``model.backbone`` a :class:`GraphedForward` (in place; returns ``model``). The state_dict,
    the parameters and the module tree are unchanged: checkpoints and optimizers see the same model."""
    if not torch.cuda.is_available():
        raise RuntimeError("solver.cuda_graphs needs a CUDA device (CUDA graphs); set solver.cuda_graphs: false")
    model.backbone.forward = GraphedForward(model.backbone, max_shapes)
    return model
