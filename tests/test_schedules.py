"""Learning-rate schedules: exact values (they are pure functions of the iteration)."""
import math

import pytest
import torch

from hvdet.optim import (
    cosine_lr,
    epochs_to_iters,
    linear_scaled_lr,
    scale_iterations,
    set_lr,
    step_lr,
    warmup_factor,
)


def test_linear_scaling_rule():
    assert linear_scaled_lr(0.02, 16) == 0.02
    assert linear_scaled_lr(0.02, 256) == 0.32          # MegDet batch 256
    assert linear_scaled_lr(0.02, 320) == 0.4           # LargeDet Table 4: batch 320, lr 0.4
    assert linear_scaled_lr(0.1, 512, base_batch=256) == 0.2
    with pytest.raises(ValueError, match="positive"):
        linear_scaled_lr(0.02, 0)


def test_linear_warmup():
    assert warmup_factor(0, 500) == 0.001
    assert warmup_factor(250, 500) == 0.001 * 0.5 + 0.5
    assert warmup_factor(499, 500) == pytest.approx(0.001 / 500 + 499 / 500, abs=1e-15)
    assert warmup_factor(500, 500) == 1.0 and warmup_factor(10_000, 500) == 1.0
    assert warmup_factor(0, 0) == 1.0                   # no warmup
    assert warmup_factor(1, 4, start_factor=0.2) == 0.2 * 0.75 + 0.25


def test_multi_step_decay_largedet_table4():
    steps = (2400, 3200)
    assert step_lr(0, 0.4, steps) == 0.4
    assert step_lr(2399, 0.4, steps) == 0.4
    assert step_lr(2400, 0.4, steps) == pytest.approx(0.04, rel=1e-15)
    assert step_lr(3199, 0.4, steps) == pytest.approx(0.04, rel=1e-15)
    assert step_lr(3200, 0.4, steps) == pytest.approx(0.004, rel=1e-15)
    assert step_lr(3359, 0.4, steps) == pytest.approx(0.004, rel=1e-15)
    assert step_lr(10, 0.4, steps, warmup_iters=100) == 0.4 * (0.001 * 0.9 + 0.1)
    assert step_lr(5, 1.0, [5, 5], gamma=0.5) == 0.25   # repeated milestones decay twice
    with pytest.raises(ValueError, match="increasing"):
        step_lr(0, 0.1, [300, 200])


def test_cosine():
    assert cosine_lr(0, 0.4, 1000) == 0.4
    assert cosine_lr(500, 0.4, 1000) == pytest.approx(0.2, abs=1e-15)
    assert cosine_lr(250, 1.0, 1000) == 0.5 * (1 + math.cos(math.pi / 4))
    assert cosine_lr(1000, 0.4, 1000) == 0.0 and cosine_lr(5000, 0.4, 1000, final_lr=0.01) == 0.01
    assert cosine_lr(500, 0.4, 1000, final_lr=0.1) == pytest.approx(0.25, abs=1e-15)
    assert cosine_lr(50, 0.4, 1000, warmup_iters=100) == pytest.approx(
        0.4 * 0.5 * (1 + math.cos(math.pi * 0.05)) * (0.001 * 0.5 + 0.5), rel=1e-15)


def test_longer_policy_and_epochs():
    assert scale_iterations(2400, 1.4) == 3360          # LargeDet "1.4x"
    assert scale_iterations(3200, 1.4) == 4480
    assert scale_iterations(5, 1.5) == 8 and scale_iterations(3, 1.5) == 5  # half rounds up
    assert scale_iterations(90_000, 1.0) == 90_000
    # 12 epochs of COCO train2017 (117,266 images with annotations): 87,950 iterations at batch 16 ...
    assert epochs_to_iters(12, 117_266, 16) == 87_950
    # ... and the same 12 epochs at batch 256, rounded up so no image is dropped
    assert epochs_to_iters(12, 117_266, 256) == 5497
    assert epochs_to_iters(1, 1024, 256) == 4
    assert epochs_to_iters(8, 117_266, 256) == math.ceil(8 * 117_266 / 256)


def test_set_lr_applies_each_groups_lr_scale():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [a], "lr_scale": 2.5}, {"params": [b]}], lr=1.0)
    set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.4]
