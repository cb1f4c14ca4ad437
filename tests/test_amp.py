"""Mixed precision on CPU: the AMP step order with AGVM, clipping and Cross-GPU BN on 2 real ranks, and a
bf16-autocast training run through train.py.

The step under test is hvdet.step.apply_gradients, the optimizer half of every training step, with
an enabled ``GradScaler("cpu")`` (the loss scaled, the gradients unscaled before clipping) and bf16
autocast, as a CUDA run does with fp16. AGVM compares the world-mean gradients with the ones it
captured in backward, which carry the loss scale: it must run before unscaling. The negative control
runs the order this code had before (unscale, then AGVM) and must raise.
"""
import json

import pytest
import torch

from hvdet.models.rcnn import MODULES as RCNN
from tests.harness import LaunchError, run_ranks
from tests.test_cgbn import detection_batch, tiny_detector


def case_amp_agvm_cgbn_step(steps: int = 3, old_order: bool = False):
    from hvdet import comm
    from hvdet.nn import CrossGPUBatchNorm2d, convert_cross_gpu_bn
    from hvdet.optim import AGVM, build_optimizer
    from hvdet.step import apply_gradients

    model = convert_cross_gpu_bn(tiny_detector())
    assert sum(isinstance(m, CrossGPUBatchNorm2d) for m in model.modules()) > 10
    opt = build_optimizer(model, "pmdlamb", lr=0.01, weight_decay=1e-4, per_module=True, modules=RCNN)
    opt = comm.distributed_optimizer(opt, model.named_parameters())
    comm.broadcast_parameters(model.state_dict(), root_rank=0)
    agvm = AGVM(opt, model, interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    assert scaler.is_enabled()
    images, targets = detection_batch(comm.rank())
    losses = []
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = model(images, targets)
        agvm.before_backward(step)
        scaler.scale(sum(loss_dict.values())).backward()
        opt.synchronize()
        if old_order:  # the order before this fix: unscale first, then AGVM
            scaler.unscale_(opt)
            agvm.after_synchronize(step)
        apply_gradients(opt, model, scaler, step, lr=0.01, agvm=agvm, clip_grad_norm=5.0)
        losses.append(float(sum(loss_dict.values()).detach()))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"losses": losses, "variances": dict(agvm.last_variances), "scales": dict(agvm.scales),
            "loss_scale": scaler.get_scale(), "params": params}


def test_amp_step_with_agvm_clipping_and_cgbn_on_two_ranks():
    res = run_ranks("tests.test_amp:case_amp_agvm_cgbn_step", np=2, launcher="horovodrun", steps=3)
    for r in res:
        assert all(torch.isfinite(torch.tensor(r["losses"]))), r["losses"]
        assert r["loss_scale"] > 0
        assert set(r["variances"]) >= {"backbone", "rpn"} and all(0 <= v <= 2 for v in r["variances"].values())
        assert any(abs(s - 1.0) > 1e-6 for s in r["scales"].values())  # AGVM moved some module's lr
    # Every rank took the same steps from the same averaged, unscaled, clipped gradients.
    torch.testing.assert_close(res[0]["params"], res[1]["params"], rtol=0, atol=0)
    assert res[0]["scales"] == res[1]["scales"]


def test_unscaling_before_agvm_is_caught():
    with pytest.raises(LaunchError, match="is not the mean over all ranks"):
        run_ranks("tests.test_amp:case_amp_agvm_cgbn_step", np=2, launcher="horovodrun", steps=1, old_order=True)


def test_bf16_autocast_training_run_on_cpu(tmp_path):
    """train.py with solver.amp_on_cpu=true: bf16 autocast, Cross-GPU BN and PMD-LAMB, 2 ranks."""
    from hvdet.data.synthetic import make_synthetic_coco
    from tests.test_train import tiny_overrides, train_py

    data = make_synthetic_coco(tmp_path / "synthetic", num_train=8, num_val=2, image_size=64)
    out = tmp_path / "run"
    train_py(tiny_overrides(data, out, iterations=3) + ["solver.amp_on_cpu=true", "checkpoint.interval=0"], np=2)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert summary["iterations"] == 3 and summary["norm"] == "cross_gpu" and summary["optimizer"] == "pmdlamb"
    assert train and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
