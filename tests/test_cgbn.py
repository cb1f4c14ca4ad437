"""Cross-GPU BatchNorm: each rank's slice through CGBN == BatchNorm2d over the whole group's batch.

Oracle: torch's BatchNorm2d on the concatenation of every rank's elements (flattened per channel,
so ranks may hold different batch and spatial sizes). Checked on real launches: horovodrun (Gloo)
at 2 and 4 ranks, mpirun for the mpi backend, and a training step of a converted torchvision model
under Horovod's DistributedOptimizer. The same oracle runs in the fast loop on simulated ranks
(threads of one process): tests/test_simulated_ranks.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from hvdet.comm import AUTO_ORDER
from hvdet.nn import (
    CrossGPUBatchNorm2d,
    bn_group_size,
    convert_cross_gpu_bn,
    group_moments,
)
from tests.harness import run_ranks

C = 3  # channels


# ---------------------------------------------------------------------------------------------
# Data and the single-process oracle (the test process and every rank build the same tensors)
# ---------------------------------------------------------------------------------------------

def make_inputs(shapes, step, dtype, seed=0, offset=0.0):
    """Every rank's input and output cotangent for one step: shapes = [(n, h, w) per rank].
    ``offset`` shifts every input: |mean| / std of 1e4 is where E[x^2] - mu^2 cancels."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    xs, gs = [], []
    for r, (n, h, w) in enumerate(shapes):
        # Per-rank offsets and scales: the group mean/variance differ from every rank's own.
        x = torch.randn(n, C, h, w, generator=gen, dtype=torch.float64) * (1 + r) + 2.0 * r - 1.0 + offset
        xs.append(x.to(dtype))
        gs.append(torch.randn(n, C, h, w, generator=gen, dtype=torch.float64).to(dtype))
    return xs, gs


def init_affine(bn, seed=0):
    gen = torch.Generator().manual_seed(seed + 7)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(C, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(C, generator=gen))


def flat(x):
    """[n, C, h, w] -> [C, n*h*w]: per-channel elements, so unequal shapes can be concatenated."""
    return x.transpose(0, 1).reshape(C, -1)


def reference(shapes, ranks, steps, momentum, affine, dtype=torch.float64, seed=0, offset=0.0):
    """BatchNorm2d over the concatenated elements of ``ranks`` in float64 (of the ``dtype`` inputs), per step."""
    bn = nn.BatchNorm2d(C, momentum=momentum, affine=affine).double()
    init_affine(bn, seed)
    results = []
    for step in range(steps):
        xs, gs = make_inputs(shapes, step, dtype, seed, offset)
        xs, gs = [xs[r].double().requires_grad_() for r in ranks], [gs[r].double() for r in ranks]
        cat = torch.cat([flat(x) for x in xs], 1)[None, :, :, None]
        y = bn(cat)[0, :, :, 0]
        parts = torch.split(y, [x.numel() // C for x in xs], 1)
        ys = [p.reshape(C, x.shape[0], x.shape[2], x.shape[3]).transpose(0, 1) for p, x in zip(parts, xs, strict=True)]
        if affine:
            bn.weight.grad = bn.bias.grad = None
        sum(((yy * g).sum() for yy, g in zip(ys, gs, strict=True)), torch.zeros((), dtype=torch.float64)).backward()
        results.append({"y": [yy.detach() for yy in ys], "dx": [x.grad for x in xs],
                        "dw": bn.weight.grad.clone() if affine else None,
                        "db": bn.bias.grad.clone() if affine else None,
                        "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
                        "num_batches_tracked": int(bn.num_batches_tracked),
                        "affine": (bn.weight.detach(), bn.bias.detach()) if affine else (None, None)})
    return results


# ---------------------------------------------------------------------------------------------
# What each rank runs
# ---------------------------------------------------------------------------------------------

def count_group_allreduces(fn):
    """Run fn() and count the group collectives (allreduce, allgather) it made."""
    from hvdet import comm

    calls, originals = [], {name: getattr(comm.Group, name) for name in ("allreduce", "allgather")}
    for name, original in originals.items():
        setattr(comm.Group, name, lambda self, *a, _f=original, **k: calls.append(1) or _f(self, *a, **k))
    try:
        out = fn()
    finally:
        for name, original in originals.items():
            setattr(comm.Group, name, original)
    return out, len(calls)


COLLECTIVES_PER_FORWARD = {"auto": 2, "chan": 1, "two_pass": 2, "one_pass": 1}  # auto on CPU: two_pass


def case_oracle(configs, sim=None):
    """Per config: this rank's outputs, input grads, local weight/bias grads and running stats.

    ``sim``: a simulated rank's world (tests/simulated.py; tests/test_simulated_ranks.py), whose own
    counter counts the collectives (patching comm.Group would count every thread's); None when launched."""
    from hvdet import comm

    rank = sim.rank() if sim else comm.rank()
    counted = sim.counted if sim else count_group_allreduces
    out = []
    for cfg in configs:
        dtype = getattr(torch, cfg.get("dtype", "float64"))
        shapes, steps = cfg["shapes"], cfg.get("steps", 2)
        bn = CrossGPUBatchNorm2d(C, momentum=cfg.get("momentum", 0.1), affine=cfg.get("affine", True),
                                 group_size=cfg.get("group_size"), backend=cfg.get("backend", "auto"),
                                 stats=cfg.get("stats", "chan"), impl=cfg.get("impl", "auto"))
        bn = bn.to(torch.float64 if dtype == torch.float64 else torch.float32)
        bn.force_group_path = cfg.get("force_group_path", False)  # a group of one still runs CGBN's arithmetic
        init_affine(bn)
        res = {"steps": []}
        for step in range(steps):
            xs, gs = make_inputs(shapes, step, dtype, offset=cfg.get("offset", 0.0))
            x = xs[rank].requires_grad_()
            bn.zero_grad()
            y, n_fwd = counted(lambda bn=bn, x=x: bn(x))
            g = gs[rank]
            _, n_bwd = counted(lambda y=y, g=g: (y * g).sum().backward())
            res["steps"].append({
                "y": y.detach(), "dx": x.grad, "n_fwd": n_fwd, "n_bwd": n_bwd,
                "dw": bn.weight.grad.clone() if bn.affine else None,
                "db": bn.bias.grad.clone() if bn.affine else None,
                "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
                "num_batches_tracked": int(bn.num_batches_tracked)})
        bn.eval()  # eval mode: running statistics, no communication (ranks call it a different number of times)
        probe = torch.randn(2, C, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        probe = probe.to(next(bn.parameters()).dtype if bn.affine else torch.float64)
        evals = counted(lambda bn=bn, probe=probe: [bn(probe) for _ in range(rank + 1)])
        res["eval"], res["n_eval"] = evals[0][0], evals[1]
        res["probe"] = probe
        res["backend"] = comm.consecutive_groups(bn.group_size).resolve_backend(torch.device("cpu"), bn.backend)
        out.append(res)
    return out


def case_oracle_and_errors(configs):
    return case_oracle(configs), case_errors()


def case_errors():
    """Errors that every rank raises together (no hang)."""
    msgs = {}
    try:
        CrossGPUBatchNorm2d(C, group_size=3)
    except ValueError as err:
        msgs["group_size"] = str(err)
    bn = CrossGPUBatchNorm2d(C)
    try:
        bn(torch.zeros(0, C, 4, 4))  # every rank empty: nothing to normalize over
    except ValueError as err:
        msgs["empty_group"] = str(err)
    return msgs


# Tolerances per input dtype: (outputs and input grads in that dtype, statistics accumulated in fp32).
# The reference sees the same rounded inputs, so only accumulation and output rounding differ.
TOL = {"float64": ({"rtol": 1e-9, "atol": 1e-9}, {"rtol": 1e-9, "atol": 1e-9}),
       "float16": ({"rtol": 1e-2, "atol": 2e-2}, {"rtol": 1e-4, "atol": 1e-4}),
       "bfloat16": ({"rtol": 2e-2, "atol": 5e-2}, {"rtol": 1e-4, "atol": 1e-4})}


def check_oracle(results, configs, world):
    """Compare every rank's results with the single-process reference of its group."""
    for cfg, per_rank in zip(configs, zip(*results, strict=True), strict=True):
        group_size = cfg.get("group_size") or world
        dtype = cfg.get("dtype", "float64")
        tol, stat_tol = TOL[dtype]
        stats = cfg.get("stats", "chan")
        if stats == "one_pass" and dtype == "float64":
            stat_tol = tol = {"rtol": 1e-7, "atol": 1e-7}  # float64 but E[x^2] - mu^2: not bit-exact
        for first in range(0, world, group_size):
            ranks = range(first, first + group_size)
            ref = reference(cfg["shapes"], ranks, cfg.get("steps", 2), cfg.get("momentum", 0.1),
                            cfg.get("affine", True), getattr(torch, dtype), offset=cfg.get("offset", 0.0))
            for r in ranks:
                res = per_rank[r]
                for step, (got, want) in enumerate(zip(res["steps"], ref, strict=True)):
                    where = f"config {cfg}, rank {r}, step {step}"
                    assert got["n_fwd"] == COLLECTIVES_PER_FORWARD[stats], where
                    assert got["n_bwd"] == 1, where
                    i = r - first
                    assert got["y"].dtype == getattr(torch, dtype), where
                    torch.testing.assert_close(got["y"].double(), want["y"][i], **tol, msg=where)
                    torch.testing.assert_close(got["dx"].double(), want["dx"][i], **tol, msg=where)
                    for key in ("running_mean", "running_var"):
                        torch.testing.assert_close(got[key].double(), want[key], **stat_tol, msg=f"{where} {key}")
                    assert got["num_batches_tracked"] == want["num_batches_tracked"], where
                    if cfg.get("affine", True):
                        # Local grads: the gradient allreduce sums them into the group's.
                        for key in ("dw", "db"):
                            total = sum(per_rank[q]["steps"][step][key].double() for q in ranks)
                            torch.testing.assert_close(total, want[key], **stat_tol, msg=f"{where} {key}")
                last = ref[-1]
                want_eval = F.batch_norm(res["probe"].double(), last["running_mean"], last["running_var"],
                                         *last["affine"], False, 0.0, 1e-5)
                torch.testing.assert_close(res["eval"].double(), want_eval, **stat_tol)
                assert res["n_eval"] == 0


# ---------------------------------------------------------------------------------------------
# Distributed tests
# ---------------------------------------------------------------------------------------------

EQUAL2 = [(2, 4, 5), (2, 4, 5)]
UNEQUAL2 = [(3, 5, 7), (1, 4, 6)]    # different batch and (padded) spatial sizes
EMPTY2 = [(2, 5, 5), (0, 5, 5)]      # rank 1 holds no image


def test_two_ranks_gloo_matches_batchnorm_over_the_group():
    configs = [
        {"shapes": EQUAL2, "backend": "torch"},
        {"shapes": EQUAL2, "backend": "horovod"},
        {"shapes": UNEQUAL2, "backend": "auto"},
        {"shapes": EMPTY2, "backend": "torch"},
        {"shapes": EMPTY2, "backend": "shm"},
        {"shapes": EMPTY2, "backend": "horovod", "stats": "one_pass"},
        {"shapes": UNEQUAL2, "backend": "torch", "stats": "one_pass"},
        {"shapes": UNEQUAL2, "backend": "shm", "stats": "two_pass"},
        {"shapes": EMPTY2, "backend": "torch", "stats": "two_pass"},
        # |mean| / std = 1e4: exact (1e-9 in float64) with Chan's merge on every backend
        {"shapes": UNEQUAL2, "backend": "shm", "offset": 1e4},
        {"shapes": EMPTY2, "backend": "torch", "offset": 1e4},
        {"shapes": UNEQUAL2, "backend": "horovod", "offset": 1e4},
        # the Triton kernels (TRITON_INTERPRET=1 on CPU) inside the layer, on two real ranks
        {"shapes": UNEQUAL2, "backend": "shm", "impl": "triton", "offset": 1e4},
        {"shapes": EMPTY2, "backend": "shm", "impl": "triton", "dtype": "float16"},
        {"shapes": UNEQUAL2, "momentum": None, "affine": False, "steps": 3},
        {"shapes": UNEQUAL2, "backend": "shm", "stats": "auto"},
        {"shapes": EQUAL2, "dtype": "float16"},
        {"shapes": UNEQUAL2, "dtype": "float16", "backend": "shm", "stats": "one_pass"},
        {"shapes": UNEQUAL2, "dtype": "bfloat16"},
    ]
    res = run_ranks("tests.test_cgbn:case_oracle_and_errors", np=2, launcher="horovodrun", configs=configs)
    check_oracle([oracle for oracle, _ in res], configs, world=2)
    # auto under horovodrun --gloo (no mpirun, so no mpi backend): the fastest of the others
    assert res[0][0][2]["backend"] == next(b for b in AUTO_ORDER["cpu"] if b != "mpi")
    for _, msgs in res:  # raised on every rank, after the same collectives: nobody hangs
        assert "group_size=3" in msgs["group_size"] and "divide the world size 2" in msgs["group_size"]
        assert "more than 1 value per channel" in msgs["empty_group"]


def test_four_ranks_groups_of_two():
    shapes = [(2, 4, 4), (1, 6, 5), (0, 4, 4), (3, 3, 3)]   # rank 2 empty, all shapes different
    configs = [{"shapes": shapes, "group_size": 2, "backend": "torch"},
               {"shapes": shapes, "group_size": 2, "backend": "horovod"},
               {"shapes": shapes, "group_size": 2, "backend": "shm"},
               {"shapes": shapes, "group_size": 2, "backend": "shm", "stats": "two_pass", "offset": 1e4},
               {"shapes": shapes, "group_size": None, "backend": "torch", "steps": 1}]
    res = run_ranks("tests.test_cgbn:case_oracle", np=4, launcher="horovodrun", configs=configs)
    check_oracle(res, configs, world=4)
    # The two groups really are separate: their running statistics differ.
    assert not torch.allclose(res[0][0]["steps"][-1]["running_mean"], res[2][0]["steps"][-1]["running_mean"])


def test_mpi_backend_under_mpirun():
    shapes = [(2, 4, 4), (1, 6, 5), (0, 4, 4), (3, 3, 3)]
    configs = [{"shapes": shapes, "group_size": 2, "backend": "mpi"},
               {"shapes": shapes, "group_size": None, "backend": "auto"},
               {"shapes": shapes, "group_size": 2, "backend": "mpi", "stats": "one_pass"},
               {"shapes": shapes, "group_size": 2, "backend": "mpi", "offset": 1e4}]
    res = run_ranks("tests.test_cgbn:case_oracle", np=4, launcher="mpirun", configs=configs)
    check_oracle(res, configs, world=4)
    assert {r[1]["backend"] for r in res} == {AUTO_ORDER["cpu"][0]}


# ---------------------------------------------------------------------------------------------
# A converted torchvision model, trained one step with Horovod's DistributedOptimizer
# ---------------------------------------------------------------------------------------------

def tiny_detector():
    """Faster R-CNN, ResNet-18-FPN with FrozenBatchNorm2d (torchvision's default), no weights, tiny images."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return FasterRCNN(backbone, num_classes=3, min_size=64, max_size=96, rpn_pre_nms_top_n_train=64,
                      rpn_post_nms_top_n_train=32, rpn_batch_size_per_image=32, box_batch_size_per_image=16)


def detection_batch(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    images = [torch.rand(3, 64, 80 + 16 * rank, generator=gen)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0], [30.0, 10.0, 60.0, 30.0]]),
                "labels": torch.tensor([1, 2])}]
    return images, targets


def classifier_batch(rank):
    gen = torch.Generator().manual_seed(200 + rank)
    return torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 4, (2,), generator=gen)


def case_train_step(detector, backend="auto"):
    """A converted detector trains a step; a converted ResNet-18 step equals BatchNorm2d on the whole batch."""
    import torchvision

    from hvdet import comm

    r, world = comm.rank(), comm.size()
    out = {}
    if detector:  # (1) FrozenBatchNorm2d -> CGBN over all ranks, one SGD step through Faster R-CNN.
        model = convert_cross_gpu_bn(tiny_detector())
        model.train()
        comm.broadcast_parameters(model.state_dict())
        opt = comm.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.01), model.named_parameters())
        images, targets = detection_batch(r)
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        out["losses"] = {k: v.item() for k, v in losses.items()}
        out["params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
        out["bn_stats"] = torch.cat([m.running_var for m in model.modules() if isinstance(m, CrossGPUBatchNorm2d)])
        out["n_cgbn"] = sum(isinstance(m, CrossGPUBatchNorm2d) for m in model.modules())

    # (2) Exactness of a whole step: ResNet-18 with CGBN on each rank's 2 images, gradients averaged
    # by Horovod, equals ResNet-18 with BatchNorm2d on all ranks' images (loss: mean over ranks).
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(num_classes=4).double()  # float64: exactness, not rounding, is tested
    init = copy.deepcopy(ref)
    net = convert_cross_gpu_bn(copy.deepcopy(ref), backend=backend)
    opt = comm.distributed_optimizer(torch.optim.SGD(net.parameters(), lr=0.5), net.named_parameters())
    x, y = classifier_batch(r)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    batches = [classifier_batch(q) for q in range(world)]
    logits = ref(torch.cat([b[0] for b in batches]))
    loss = sum(F.cross_entropy(part, b[1]) for part, b in zip(logits.split(2), batches, strict=True)) / world
    loss.backward()
    ref_opt.step()
    out["step_max_err"] = max((a - b).abs().max().item() for a, b in zip(net.state_dict().values(),
                                                                          ref.state_dict().values(), strict=True)
                              if a.is_floating_point())
    out["step_max_change"] = max((p - q).abs().max().item()
                                 for p, q in zip(ref.parameters(), init.parameters(), strict=True))
    return out


def test_converted_detector_trains_a_step_gloo():
    res = run_ranks("tests.test_cgbn:case_train_step", np=2, launcher="horovodrun", detector=True)
    for o in res:
        assert o["n_cgbn"] == 20  # ResNet-18: stem + 4 stages x 2 blocks x 2 + 3 downsample
        assert all(torch.isfinite(torch.tensor(v)) for v in o["losses"].values()), o["losses"]
        # Shared statistics and averaged gradients: every rank holds the same model after the step.
        torch.testing.assert_close(o["params"], res[0]["params"], rtol=0, atol=0)
        torch.testing.assert_close(o["bn_stats"], res[0]["bn_stats"], rtol=0, atol=0)
        assert not torch.allclose(o["bn_stats"], torch.ones_like(o["bn_stats"]))  # statistics were updated
        assert o["step_max_err"] < 1e-9 and o["step_max_change"] > 0.1, (o["step_max_err"], o["step_max_change"])


def test_training_step_is_exact_under_mpirun():
    # The mpi backend's allreduces run while Horovod's MPI thread averages gradients.
    for o in run_ranks("tests.test_cgbn:case_train_step", np=2, launcher="mpirun", detector=False, backend="mpi"):
        assert o["step_max_err"] < 1e-9 and o["step_max_change"] > 0.1, (o["step_max_err"], o["step_max_change"])


# ---------------------------------------------------------------------------------------------
# Single process
# ---------------------------------------------------------------------------------------------

def test_single_rank_is_batchnorm2d():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(C)
    init_affine(ref)
    bn = convert_cross_gpu_bn(copy.deepcopy(ref))
    assert isinstance(bn, CrossGPUBatchNorm2d) and isinstance(bn, nn.BatchNorm2d)
    x = torch.randn(4, C, 5, 5)
    torch.testing.assert_close(bn(x), ref(x), rtol=0, atol=0)
    assert torch.equal(bn.running_var, ref.running_var) and int(bn.num_batches_tracked) == 1


def test_convert_copies_statistics_and_parameters():
    det = tiny_detector()
    frozen = [m for m in det.modules() if isinstance(m, FrozenBatchNorm2d)]
    gen = torch.Generator().manual_seed(3)
    for m in frozen:  # non-trivial statistics, so a missed copy shows
        for name in ("weight", "bias", "running_mean"):
            getattr(m, name).copy_(torch.randn(m.weight.shape, generator=gen) * 0.1 + (name == "weight"))
        m.running_var.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    det.double().eval()  # float64: a copied statistic must give the same features to ~1e-12
    images = [torch.rand(3, 64, 80, generator=gen, dtype=torch.float64)]
    with torch.no_grad():
        want = det.backbone(det.transform(images)[0].tensors)
        det = convert_cross_gpu_bn(det, group_size=1, backend="torch")
        got = det.backbone(det.transform(images)[0].tensors)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in det.modules())
    cgbn = [m for m in det.modules() if isinstance(m, CrossGPUBatchNorm2d)]
    assert len(cgbn) == len(frozen) == 20
    assert all(m.weight.requires_grad and m.backend == "torch" and m.group_size == 1 for m in cgbn)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10)

    bn = nn.BatchNorm2d(C, momentum=0.3, eps=1e-3).double()
    bn.weight.requires_grad_(False)
    bn.running_mean.fill_(0.25)
    bn.num_batches_tracked.fill_(7)
    bn.eval()
    new = convert_cross_gpu_bn(bn, stats="one_pass")
    assert (new.momentum, new.eps, new.stats, new.training) == (0.3, 1e-3, "one_pass", False)
    assert new.weight.dtype == torch.float64 and not new.weight.requires_grad
    assert float(new.running_mean[0]) == 0.25 and int(new.num_batches_tracked) == 7
    assert convert_cross_gpu_bn(new) is new


def test_one_pass_loses_precision_where_two_pass_and_chan_do_not():
    from hvdet import comm

    group = comm.consecutive_groups(None)  # one process: a group of one, the same arithmetic
    x = 1000.0 + 0.01 * torch.randn(4, C, 16, 16, generator=torch.Generator().manual_seed(0))  # |mu| >> sigma
    want = x.double().var(dim=(0, 2, 3), unbiased=False)
    errs = {}
    for stats in ("two_pass", "chan", "one_pass"):
        _, var, _ = group_moments(x, group, stats=stats)
        errs[stats] = ((var.double() - want).abs() / want).max().item()
    assert max(errs["two_pass"], errs["chan"]) < 1e-3 < errs["one_pass"], errs


def test_bn_group_size():
    assert bn_group_size(32, 2, 16) == 16      # MegDet: BN size 32 at 2 images per GPU
    assert bn_group_size(4, 2, 8) == 2
    assert bn_group_size(2, 2, 2) == 1
    with pytest.raises(ValueError, match="not a multiple of 2 images per GPU"):
        bn_group_size(5, 2, 8)
    with pytest.raises(ValueError, match="does not divide the world of 2 ranks"):
        bn_group_size(32, 2, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        bn_group_size(0, 2, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        CrossGPUBatchNorm2d(C, backend="nccl")
    with pytest.raises(ValueError, match="group_size=2.*divide the world size 1"):
        CrossGPUBatchNorm2d(C, group_size=2).train()(torch.randn(2, C, 3, 3))
