"""Detection transforms: multi-scale shorter-side resize, horizontal flip, to a float tensor.

    train_tf = build_transforms(train=True, min_sizes=(640, 672, 704, 736, 768, 800), max_size=1333)
    eval_tf = build_transforms(train=False)

Built from ``torchvision.transforms.v2``, which moves boxes (``BoundingBoxes``) and masks (``Mask``)
together with the image; targets go in and come out as plain tensors.

**How this meets the model's own resize.** torchvision's detectors resize again inside the model
(``GeneralizedRCNNTransform``: shorter side ``min_size``, longer side at most ``max_size``):

* Training: the dataset transform makes the random multi-scale choice (in DataLoader workers,
  seeded per sample so a resumed run draws the same scales and flips) and the flip. The model
  should then not resize again: build it with ``_skip_resize=True`` (a torchvision
  ``GeneralizedRCNNTransform`` option that skips the resize in training mode only), or at least
  with the same ``max_size``; otherwise every image is re-scaled to the model's one ``min_size``
  and the multi-scale choice is lost.
* Evaluation: the dataset transform does **not** resize. The model resizes to its ``min_size``
  (give it ``min_sizes[-1]``, the test scale, and the same ``max_size``) and maps its boxes and
  masks back to the input size, which is then the original image size that COCO's ground truth
  is in. ``hvdet.evaluation.evaluate`` checks this.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class DetectionTransforms:
    """``(PIL image or uint8 tensor, target) -> (FloatTensor[3,H,W] in [0,1], target)``."""

    def __init__(self, train: bool, min_sizes: Sequence[int] = (800,), max_size: int = 1333,
                 flip_prob: float = 0.5):
        if not min_sizes or any(int(s) <= 0 for s in min_sizes) or max_size <= 0:
            raise ValueError(f"min_sizes {min_sizes!r} and max_size {max_size!r} must be positive")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.train, self.min_sizes, self.max_size, self.flip_prob = train, tuple(min_sizes), max_size, flip_prob
        steps = [v2.ToImage()]
        if train:
            # Integer uint8 resize is cheaper than float; convert to float last.
            steps += [v2.RandomShortestSize([int(s) for s in min_sizes], max_size),
                      v2.RandomHorizontalFlip(flip_prob)]
        steps.append(v2.ToDtype(torch.float32, scale=True))
        self.pipeline = v2.Compose(steps)

    def __call__(self, image, target: dict):
        height, width = v2.functional.get_size(image)
        wrapped = dict(target)
        wrapped["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
        if "masks" in target:
            wrapped["masks"] = tv_tensors.Mask(target["masks"])
        image, wrapped = self.pipeline(image, wrapped)
        # Plain tensors out: tv_tensor subclasses would ride along into the model's ops.
        out = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in wrapped.items()}
        return image.as_subclass(torch.Tensor), out

    def __repr__(self) -> str:
        return (f"DetectionTransforms(train={self.train}, min_sizes={self.min_sizes}, max_size={self.max_size}, "
                f"flip_prob={self.flip_prob})")


def build_transforms(train: bool, min_sizes: Sequence[int] = (800,), max_size: int = 1333,
                     flip_prob: float = 0.5) -> DetectionTransforms:
    """Train: random shorter side from ``min_sizes`` (longer side <= ``max_size``) and flip.
    Eval: to tensor only; the sizes are then unused (the model resizes, see the module docstring)."""
    return DetectionTransforms(train, min_sizes, max_size, flip_prob)
