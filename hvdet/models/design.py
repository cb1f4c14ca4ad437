"""The fast CPU variants' design: what each choice cuts from torchvision's Faster/Mask R-CNN.

``benchmarks/model_step.py`` measures the effect of each choice (docs/models.md has the numbers).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FastDesign:
    """The CPU variant, sized for 128-px images with objects of 20-64 px.

    At torchvision's defaults a step on 8 such images costs 10.5 s on one thread, 52% of it in the
    CPU ``roi_align`` backward (2000 proposals -> 512 sampled RoIs per image, 7x7 bins, 256 channels).
    RoIAlign work is RoIs x bins x channels, so all three shrink here; the rest follows the objects.
    """

    returned_layers: tuple[int, ...] = (2, 3)  # C3, C4 (strides 8, 16): 20-64 px objects need no
    #   stride-4 map (C2 is 4x the pixels of C3) and no stride-32 map; layer4 is then never built.
    pool_level: bool = False  # torchvision adds a max-pooled top level ("pool"); not needed here
    fpn_channels: int = 64  # FPN width; the RPN head, RoIAlign and box head all scale with it
    anchor_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 96))  # px per level, covering 20-96 px
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    roi_output_size: int = 5  # 5x5 bins instead of 7x7: half the RoIAlign and box-head input
    roi_canonical_scale: int = 36  # torchvision's 224 px at 800-px inputs, scaled to 128 px
    representation_size: int = 256  # TwoMLPHead width (torchvision: 1024)
    mask_roi_output_size: int = 14  # as torchvision: 28x28 mask targets
    mask_layers: tuple[int, ...] = (64, 64)  # torchvision: 4 x 256
    min_size: int = 128
    max_size: int = 213  # torchvision's 1333/800 aspect cap at a 128-px shorter side
    # Sampling and proposal counts (torchvision: 2000/1000 pre-NMS per level, 2000/1000 post-NMS,
    # 256 RPN anchors and 512 RoIs sampled per image). A few objects per image need far fewer.
    detector_kwargs: tuple[tuple[str, object], ...] = (
        ("rpn_pre_nms_top_n_train", 300), ("rpn_pre_nms_top_n_test", 300),
        ("rpn_post_nms_top_n_train", 100), ("rpn_post_nms_top_n_test", 100),
        ("rpn_batch_size_per_image", 128), ("box_batch_size_per_image", 32),
    )

    def __post_init__(self):
        levels = len(self.returned_layers) + self.pool_level
        if len(self.anchor_sizes) != levels or len({len(s) for s in self.anchor_sizes}) != 1:
            # torchvision's RPN head shares one conv over all levels: same anchor count everywhere.
            raise ValueError(f"FastDesign needs one tuple of anchor sizes per FPN level ({levels}), all of the "
                             f"same length; got {self.anchor_sizes}")


FAST = FastDesign()
# The 64-px variant (the batch-size study's, docs/study.md): objects of 3-38 px, so every size halves;
# the stride-8 and -16 maps are 8x8 and 4x4. At 64 px the convolutions are no longer most of a step
# (RoIAlign's CPU backward was 23%), so training samples half the proposals and RoIs (at most 12
# objects an image); evaluation keeps the 128-px variant's 100 proposals. A step on 8 images: 107 ms
# on one thread against 132 ms with the 128-px sampling (the 128-px model: about 190 ms).
FAST64 = FastDesign(anchor_sizes=((8, 16), (32, 48)), roi_canonical_scale=18, min_size=64, max_size=107,
                    detector_kwargs=(("rpn_pre_nms_top_n_train", 150), ("rpn_pre_nms_top_n_test", 300),
                                     ("rpn_post_nms_top_n_train", 50), ("rpn_post_nms_top_n_test", 100),
                                     ("rpn_batch_size_per_image", 64), ("box_batch_size_per_image", 16)))
FAST_DESIGNS = {128: FAST, 64: FAST64}  # Arch.image_px -> its design
