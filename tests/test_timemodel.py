"""hvdet.timemodel: the allreduce, fusion and CGBN formulas against hand-computed values, the model's
monotonicity, the calibration check, and ``hvdet project`` / ``python -m hvdet.timemodel``."""
import itertools
import json
import re
import subprocess
import sys

import pytest

from hvdet.cli import main as hvdet_main
from hvdet.timemodel import measured
from hvdet.timemodel.cli import main as project_main
from hvdet.timemodel.model import (
    Horovod,
    Link,
    Step,
    System,
    Workload,
    allreduce_s,
    cgbn_s,
    from_measured_step,
    hierarchical_allreduce_s,
    horovod_schedule,
    ring_allreduce_s,
    step,
    time_to_train_s,
    tree_allreduce_s,
)
from hvdet.timemodel.presets import GPU_SYSTEMS, SYSTEMS
from hvdet.timemodel.validation import CASES
from tests.harness import ROOT

US = 1e-6
# 8 GPUs a node; 100 GB/s and 2 us a hop inside, 10 GB/s (all NICs) and 5 us a hop between nodes;
# 10 us per collective; small collectives 5 us + 1 us a hop.
TOY = System("toy", 8, Link(100e9, 2 * US), Link(10e9, 5 * US), base_latency_s=10 * US,
             bn_base_latency_s=5 * US, bn_hop_latency_s=1 * US)
FLAT = System("flat", 1024, Link(10e9, 3 * US), Link(10e9, 3 * US), 0.0, 0.0, 0.0)  # one link class
B = 100e6  # bytes


def test_ring_allreduce_matches_hand_computed_values():
    # N=2, one node: 2*1/2 * 1e8 / 1e11 = 1.000 ms; + base 10 us; + 2 hops x 2 us = 4 us -> 1.014 ms
    assert ring_allreduce_s(B, 2, TOY) == pytest.approx(1.014e-3, rel=1e-12)
    # N=8, one node: 2*7/8 * 1e8 / 1e11 = 1.750 ms; + 10 us; + 14 hops x 2 us = 28 us -> 1.788 ms
    assert ring_allreduce_s(B, 8, TOY) == pytest.approx(1.788e-3, rel=1e-12)
    # N=16, two nodes: the ring's bandwidth is the NICs' 10 GB/s: 2*15/16 * 1e8 / 1e10 = 18.75 ms;
    # + 10 us; of the 30 hops 2 cross nodes (2 x 5 us) and 28 stay inside (28 x 2 us) -> 18.826 ms
    assert ring_allreduce_s(B, 16, TOY) == pytest.approx(18.826e-3, rel=1e-12)
    assert ring_allreduce_s(B, 1, TOY) == allreduce_s(B, 1, TOY) == 0.0


def test_ring_is_the_textbook_formula_on_one_link_class():
    """2(N-1)/N * bytes / bandwidth + 2(N-1) * latency, the issue's formula."""
    for n in (2, 8, 1024):
        assert ring_allreduce_s(B, n, FLAT) == pytest.approx(2 * (n - 1) / n * B / 10e9 + 2 * (n - 1) * 3 * US)


def test_hierarchical_and_tree_match_hand_computed_values():
    # N=16 = 2 nodes of 8: in the node (reduce-scatter, then allgather) 7/8 * 1e8 / 1e11 + 7 x 2 us
    # = 0.889 ms each; across the nodes 2*1/2 * 1e8 / 1e10 + 2 x 5 us = 10.010 ms; + 3 x 10 us
    # -> 2 x 0.889 + 10.010 + 0.030 = 11.818 ms
    assert hierarchical_allreduce_s(B, 16, TOY) == pytest.approx(11.818e-3, rel=1e-12)
    assert hierarchical_allreduce_s(B, 8, TOY) == ring_allreduce_s(B, 8, TOY)  # one node: a plain ring
    # tree: 2 * 1e8 / 1e10 = 20 ms; + 10 us; + 2 x (7 x 2 us + log2(2) x 5 us) = 38 us -> 20.048 ms
    assert tree_allreduce_s(B, 16, TOY) == pytest.approx(20.048e-3, rel=1e-12)
    assert allreduce_s(B, 16, TOY) == pytest.approx(11.818e-3, rel=1e-12)  # best: hierarchical here
    assert allreduce_s(B, 16, TOY, "ring") == pytest.approx(18.826e-3, rel=1e-12)
    # tiny messages at 1024 GPUs: latency decides, and the tree's log2 beats the ring's 2(N-1)
    tiny = [f(1e3, 1024, TOY) for f in (tree_allreduce_s, hierarchical_allreduce_s, ring_allreduce_s)]
    assert tiny == sorted(tiny) and tiny[0] < tiny[2] / 10


def test_fusion_count_when_every_gradient_is_ready_at_once():
    # 200 MB in 64 MiB buffers: ceil(200e6 / 67,108,864) = 3 allreduces, back to back, all exposed:
    # 3 x 1 ms + 200e6 B / 1e9 B/s = 203 ms
    s = horovod_schedule(200e6, 0.0, Horovod(fusion_bytes=64 * 2**20), lambda b: 1e-3 + b / 1e9)
    assert (s.ops, s.comm_s, s.exposed_s) == (3, pytest.approx(0.203), pytest.approx(0.203))
    assert horovod_schedule(200e6, 0.0, Horovod(), lambda b: 1e-3 + b / 1e9).ops == 2  # 128 MiB buffers


def test_overlap_hides_the_allreduces_that_backward_outlasts():
    # 10 bytes over a 10 ms backward, 5 ms cycles, 1 ms an allreduce: at 0 ms nothing is ready; at
    # 5 ms half is (one allreduce, 5-6 ms); at 10 ms the rest (10-11 ms): 2 ops, 1 ms exposed.
    s = horovod_schedule(10.0, 0.010, Horovod(cycle_s=0.005), lambda b: 1e-3)
    assert (s.ops, s.comm_s, s.exposed_s) == (2, pytest.approx(2e-3), pytest.approx(1e-3))
    # communication slower than backward: 10 bytes at 1 s a byte cannot hide behind 10 ms
    slow = horovod_schedule(10.0, 0.010, Horovod(cycle_s=0.005), lambda b: b)
    assert slow.exposed_s == pytest.approx(10.0 + 0.005 - 0.010)


def test_cgbn_collectives_are_latency_bound_on_the_critical_path():
    w = Workload(1e6, 1.0, 0.5, bn_layers=53, bn_collectives=3, bn_group=16)
    # 32 GPUs, groups of 16 = 2 nodes: 5 us + 2 x (16 - 2) x 1 us + 2 x 1 x 5 us = 43 us, x 159 collectives
    assert cgbn_s(w, 32, TOY) == pytest.approx(159 * 43 * US)
    # 8 GPUs: the group is the 8 (one node): 5 + 2 x 7 x 1 = 19 us, x 159
    assert cgbn_s(w, 8, TOY) == pytest.approx(159 * 19 * US)
    assert cgbn_s(w, 1, TOY) == 0.0
    assert step(w, 32, TOY).cgbn_s == cgbn_s(w, 32, TOY)


def test_step_efficiency_and_time_to_train():
    w = Workload(25e6, 0.3, 0.2, images_per_gpu=2)
    one = step(w, 1, TOY)
    assert (one.step_s, one.efficiency, one.allreduce_ops) == (0.3, 1.0, 0)
    # nothing overlaps when backward is instant: the mean wait for a cycle (7/16 of 1 ms over the 8
    # phases) plus one 100 MB allreduce in a 128 MiB buffer
    s = step(Workload(25e6, 0.3, 0.0), 2, TOY)
    assert s.exposed_s == pytest.approx(7 / 16 * 1e-3 + ring_allreduce_s(100e6, 2, TOY))
    assert time_to_train_s(Step(8, 1.0, 0.0, 0, 0.0, 0.0), images=1600, images_per_gpu=2) == 100.0


@pytest.mark.parametrize("name", GPU_SYSTEMS)
def test_efficiency_falls_with_gpus_and_never_exceeds_one(name):
    w = Workload(41.8e6, 0.35, 0.23, bn_layers=53, bn_collectives=2, bn_group=16)
    effs = [step(w, n, SYSTEMS[name]).efficiency for n in (1, 8, 16, 32, 64, 128, 256, 512, 1024)]
    assert effs[0] == 1.0 and all(a >= b for a, b in itertools.pairwise(effs)), effs
    slow = SYSTEMS["cpu-vm"]  # the same model over 1 GB/s links scales far worse
    assert step(w, 8, slow).efficiency < step(w, 8, SYSTEMS[name]).efficiency


def test_compute_from_a_measured_step_reproduces_it():
    w = Workload(41.8e6, 0.0, 0.0, bn_layers=53, bn_collectives=3, bn_group=8)
    fitted = from_measured_step(w, 0.5, 64, TOY, Horovod(cycle_s=5e-3))
    # to within the simulated loop's steps: its exposed time moves in jumps of a fraction of a cycle
    assert step(fitted, 64, TOY, Horovod(cycle_s=5e-3)).step_s == pytest.approx(0.5, abs=5e-3 / 8)
    assert 0 < fitted.compute_s < 0.5 and fitted.backward_s == pytest.approx(2 / 3 * fitted.compute_s)
    assert from_measured_step(w, 0.5, 1, TOY).compute_s == pytest.approx(0.5)
    with pytest.raises(ValueError, match="modelled communication"):
        from_measured_step(w, 1e-4, 64, TOY)


def test_calibration_predicts_two_ranks_from_one(tmp_path):
    """A hand-made 1-rank / 2-rank pair: the prediction is the 1-rank step + CGBN + the exposed allreduce."""
    pair = {"one": {"world_size": 1, "images_per_gpu": 8, "arch": "fasterrcnn_resnet18_fpn_fast", "data_s": 0.01,
                    "forward_s": 0.09, "backward_allreduce_s": 0.0, "optimizer_s": 0.15},
            "two": {"world_size": 2, "images_per_gpu": 8, "step_s": 0.29}}
    (tmp_path / "pair.json").write_text(json.dumps(pair))
    one, two = measured.load(f"{tmp_path}/pair.json#one"), measured.load(f"{tmp_path}/pair.json#two")
    assert (one.step_s, one.backward_s, two.world_size) == (pytest.approx(0.25), 0.0, 2)
    system = System("s", 2, Link(1e9, 0.0), Link(1e9, 0.0), 0.0, bn_base_latency_s=10 * US, bn_hop_latency_s=0.0)
    c = measured.calibrate(one, two, system, Horovod(), params=1e6, bn_layers=15, bn_collectives=3)
    # 15 x 3 x 10 us = 0.45 ms of CGBN; 4 MB over 2 ranks at 1 GB/s = 4 ms, after a mean cycle wait of
    # 7/16 ms: 0.25 + 0.00045 + 0.0044375 = 0.2548875 s against 0.29 s measured: -12.1%
    assert c.predicted_s == pytest.approx(0.2548875, rel=1e-9)
    assert c.error == pytest.approx(0.2548875 / 0.29 - 1, rel=1e-9)
    with pytest.raises(ValueError, match="1-rank"):
        measured.calibrate(two, two, system, Horovod(), params=1e6)
    # benchmarks/ddp_baseline.py's results name the ranks in the setting's key
    (tmp_path / "ddp.json").write_text(json.dumps({"results": {"hvdet-horovodrun-2": {"step_s": 0.3}}}))
    assert measured.load(f"{tmp_path}/ddp.json#results.hvdet-horovodrun-2").world_size == 2


def test_calibrate_command_prints_the_prediction_error(capsys, tmp_path):
    pair = {"one": {"world_size": 1, "images_per_gpu": 8, "data_s": 0.01, "forward_s": 0.08,
                    "backward_allreduce_s": 0.15, "optimizer_s": 0.01},
            "two": {"world_size": 2, "images_per_gpu": 8, "data_s": 0.015, "forward_s": 0.09,
                    "backward_allreduce_s": 0.175, "optimizer_s": 0.01}}
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(pair))
    assert project_main(["--calibrate", f"{path}#one", f"{path}#two", "--system", "cpu-vm"]) == 0
    out = capsys.readouterr().out
    assert "2 ranks: predicted" in out and "measured 0.2900 s" in out
    predicted = float(re.search(r"predicted ([\d.]+) s", out).group(1))
    error = float(re.search(r"error ([+-][\d.]+)%", out).group(1))
    assert 0.25 < predicted < 0.29 and error == pytest.approx(100 * (predicted / 0.29 - 1), abs=0.06)
    assert project_main(["--calibrate", f"{path}#two", f"{path}#two"]) == 2  # the reference must be 1 rank


def test_a_run_directory_is_read_from_its_metrics_and_summary(tmp_path):
    recs = [{"type": "train", "iteration": i, "data_s": 0.01, "forward_s": 0.1 * i, "backward_allreduce_s": 0.2,
             "optimizer_s": 0.01} for i in (1, 2, 3, 4)] + [{"type": "eval", "iteration": 4, "eval_s": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"world_size": 2, "images_per_gpu": 8, "arch": "x"}))
    m = measured.load(str(tmp_path))
    # the first record (warm-up) is left out: median forward of 0.2, 0.3, 0.4 = 0.3
    assert (m.step_s, m.world_size, m.images_per_gpu, m.arch) == (pytest.approx(0.52), 2, 8, "x")


def _rows(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^\| (\d+) \| [\d.]+ \|", text, re.MULTILINE)]


def test_hvdet_project_prints_8_to_1024_gpus_for_each_named_system(capsys):
    assert hvdet_main(["project"]) == 0
    out = capsys.readouterr().out
    for name in GPU_SYSTEMS:
        assert f"## {name}:" in out
    assert _rows(out) == [8, 16, 32, 64, 128, 256, 512, 1024] * len(GPU_SYSTEMS)
    assert "time to train" in out and "a V100's step" in out


def test_project_from_a_run_and_overrides(capsys, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"world_size": 1, "images_per_gpu": 2, "step_s": 0.1}))
    args = ["--metrics", str(tmp_path / "m.json"), "--system", "dgx-h100", "--gpus", "8,1024", "--norm", "frozen"]
    assert project_main(args) == 0
    fast = capsys.readouterr().out
    assert _rows(fast) == [8, 1024] and "no CGBN" in fast
    assert project_main([*args, "--inter-gbs", "1"]) == 0  # a slow network costs efficiency at 1024
    eff = [float(x) for x in re.findall(r"\| ([\d.]+)% \|", fast + capsys.readouterr().out)]
    assert eff[1] > eff[3]
    assert project_main(["--model", "vgg16"]) == 2  # no reference step: an error, not a guess
    assert "--step-s" in capsys.readouterr().err


def test_validate_prints_the_table_with_an_error_per_published_run(capsys):
    assert project_main(["--validate"]) == 0
    out = capsys.readouterr().out
    assert "| error |" in out.splitlines()[2]
    errors = re.findall(r"\| ([+-]\d+)% \|", out)
    assert len(errors) == len(CASES) >= 10
    assert "MegDet" in out and "LargeDet" in out and "Horovod" in out and "MLPerf" in out


def test_docs_show_the_validation_table_as_printed():
    from hvdet.timemodel.validation import predict, table

    printed = table([predict(c) for c in CASES])
    assert printed.split("\n\n")[0] in (ROOT / "docs" / "scaling.md").read_text()


def test_timemodel_loads_no_torch_and_runs_as_a_module():
    code = ("import sys; import hvdet.timemodel.model, hvdet.timemodel.cli, hvdet.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    out = subprocess.run([sys.executable, "-m", "hvdet.timemodel", "--system", "dgx-a100", "--gpus", "8,16"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert _rows(out) == [8, 16]
