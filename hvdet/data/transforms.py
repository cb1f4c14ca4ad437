"""Detection transforms: multi-scale shorter-side resize or large-scale jitter, horizontal flip, to float.

    train_tf = build_transforms(train=True, min_sizes=(640, 672, 704, 736, 768, 800), max_size=1333)
    lsj_tf = build_transforms(train=True, max_size=1024, augmentation="lsj", lsj_scale=(0.1, 2.0))
    eval_tf = build_transforms(train=False)

``augmentation="lsj"`` is large-scale jitter as in torchvision's detection references (``--data-augmentation
lsj``; Ghiasi et al., "Simple Copy-Paste", 2021): the image is resized to fit a ``max_size`` square times a
scale drawn uniformly from ``lsj_scale`` (``v2.ScaleJitter``), randomly cropped to at most that square and
padded at the bottom and right to exactly ``max_size`` x ``max_size`` with the model's mean pixel (which
its normalization turns into 0, what its own batch padding adds), then flipped. Boxes are clipped to the
crop; boxes narrower or lower than 1 px afterwards are dropped with their labels and masks
(``v2.SanitizeBoundingBoxes``). ``min_sizes`` is not used in training then (evaluation still resizes to
``max(min_sizes)``: give ``min_sizes: [S], max_size: S`` so that LSJ's scale 1.0 is the test scale).

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
  is in. ``hvdet.eval.coco.evaluate`` checks this.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from hvdet.registry import AUGMENTATIONS

# torchvision's detectors normalize with ImageNet's mean; LSJ pads with it so padding normalizes to 0.
MEAN_RGB = (0.485, 0.456, 0.406)


class FixedSizeCrop:
    """A random crop to at most ``size`` x ``size``, then padding at the bottom and right to exactly
    that (torchvision references' ``FixedSizeCrop``). Boxes are clipped to the crop by the v2 kernels;
    the caller drops the ones left empty. Draws from torch's global RNG (seeded per sample)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, target: dict):
        height, width = v2.functional.get_size(image)
        crop_h, crop_w = min(height, self.size), min(width, self.size)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        padding = [0, 0, self.size - crop_w, self.size - crop_h]  # left, top, right, bottom
        fill = list(MEAN_RGB) if image.is_floating_point() else [round(255 * m) for m in MEAN_RGB]

        def fit(x, fill=0):
            return v2.functional.pad(v2.functional.crop(x, top, left, crop_h, crop_w), padding, fill=fill)

        return fit(image, fill), {k: fit(v) if isinstance(v, (tv_tensors.BoundingBoxes, tv_tensors.Mask)) else v
                                  for k, v in target.items()}


class DetectionTransforms:
    """``(PIL image or uint8 tensor, target) -> (FloatTensor[3,H,W] in [0,1], target)``."""

    def __init__(self, train: bool, min_sizes: Sequence[int] = (800,), max_size: int = 1333,
                 flip_prob: float = 0.5, augmentation: str = "standard", lsj_scale: Sequence[float] = (0.1, 2.0)):
        if not min_sizes or any(int(s) <= 0 for s in min_sizes) or max_size <= 0:
            raise ValueError(f"min_sizes {min_sizes!r} and max_size {max_size!r} must be positive")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")
        if len(lsj_scale) != 2 or not 0 < lsj_scale[0] <= lsj_scale[1]:
            raise ValueError(f"lsj_scale must be [low, high] with 0 < low <= high, got {list(lsj_scale)}")
        self.train, self.min_sizes, self.max_size, self.flip_prob = train, tuple(min_sizes), max_size, flip_prob
        self.augmentation, self.lsj_scale = augmentation, tuple(float(s) for s in lsj_scale)
        steps = [v2.ToImage()]
        # Integer uint8 resize is cheaper than float; convert to float last.
        if train and augmentation == "lsj":
            steps += [v2.ScaleJitter((max_size, max_size), scale_range=self.lsj_scale),
                      FixedSizeCrop(max_size),
                      v2.RandomHorizontalFlip(flip_prob),
                      v2.SanitizeBoundingBoxes(min_size=1)]  # boxes cropped away, with their labels and masks
        elif train:
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
        lsj = f", augmentation='lsj', lsj_scale={self.lsj_scale}" if self.augmentation == "lsj" else ""
        return (f"DetectionTransforms(train={self.train}, min_sizes={self.min_sizes}, max_size={self.max_size}, "
                f"flip_prob={self.flip_prob}{lsj})")


def build_transforms(train: bool, min_sizes: Sequence[int] = (800,), max_size: int = 1333,
                     flip_prob: float = 0.5, augmentation: str = "standard",
                     lsj_scale: Sequence[float] = (0.1, 2.0)) -> DetectionTransforms:
    """Train: random shorter side from ``min_sizes`` (longer side <= ``max_size``) and flip; or, with
    ``augmentation="lsj"``, large-scale jitter to a ``max_size`` square and flip.
    Eval: to tensor only; the sizes are then unused (the model resizes, see the module docstring)."""
    return DetectionTransforms(train, min_sizes, max_size, flip_prob, augmentation, lsj_scale)
