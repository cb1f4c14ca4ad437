"""train.py end to end on tiny synthetic data: 2 ranks under horovodrun and mpirun, and one plain process.

One 2-rank run (4 iterations, checkpoints at 2 and 4) is shared by the tests below: its outputs,
resuming it exactly, resuming it on another number of ranks, evaluating its checkpoint.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvdet.config import load_config
from tests.harness import ROOT, LaunchError, launch_command, rank_env, run_command

RECIPE = "configs/synthetic_demo.yaml"
BASE_LR = load_config(ROOT / RECIPE).solver.base_lr  # at the recipe's reference batch of 16
LAUNCH_TIMEOUT_S = 300  # only to kill a hung launch (the harness reports it); no test asserts on time


def tiny_overrides(data: dict, output_dir, iterations: int = 4) -> list[str]:
    """The demo recipe, shrunk: 64-px images, 2 per rank, 4 iterations, no worker processes."""
    root = Path(data["train_ann"]).parent.parent  # the synthetic layout is the recipe's, under another root
    return [f"data.root={root}",
            "data.images_per_gpu=2", "data.num_workers=0", "data.min_sizes=[64]", "data.max_size=64",
            f"solver.max_iters={iterations}", "solver.steps=[]",
            "solver.warmup_iters=1", "eval.interval=0", "eval.images_per_gpu=2", "log.interval=2",
            "log.progress=false", "checkpoint.interval=2", f"output_dir={output_dir}"]


def train_py(args: list[str], np: int = 0, launcher: str = "horovodrun") -> str:
    """Run train.py (np=0: one plain process); return its output, raise LaunchError on failure."""
    program = ["train.py", "--config", RECIPE, *args]
    cmd = [sys.executable, *program] if np == 0 else launch_command(np, launcher, program)
    return run_command(cmd, LAUNCH_TIMEOUT_S, rank_env(threads=1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hvdet.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=4, image_size=64)


@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory):
    """4 iterations on 2 ranks under horovodrun (Gloo), checkpoints at 2 and 4, evaluation at the end."""
    out = tmp_path_factory.mktemp("run_a")
    log = train_py(tiny_overrides(data, out), np=2)
    return out, log


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_two_ranks_write_metrics_summary_mllog_checkpoints_and_plots(run_a):
    out, log = run_a
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["iteration"] for r in train] == [2, 4] and [r["iteration"] for r in evals] == [4]
    for r in train:
        assert set(r) >= {"iteration", "epoch", "elapsed_s", "lr", "loss", "losses", "images_per_s", "data_s",
                          "forward_s", "backward_allreduce_s", "optimizer_s", "max_data_s"}
        assert r["max_data_s"] >= r["data_s"] >= 0 and r["images_per_s"] > 0
        assert set(r["losses"]) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        # log.diagnostics (on by default): LargeDet Fig. 3's trust ratios, per module
        assert {"backbone", "fpn", "rpn", "roi_box"} <= set(r["trust_ratio"])  # hvdet.models.rcnn.MODULES
        # (0 for a tensor whose weights are all zero, as a freshly initialized bias)
        assert all(0 <= v["min"] <= v["median"] <= v["max"] < float("inf") for v in r["trust_ratio"].values())
        assert all(v["median"] > 0 for v in r["trust_ratio"].values())
        assert "agvm_variance" not in r  # AGVM off
    assert (out / "plots" / "diagnostics.png").is_file()
    assert set(evals[0]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 4 and summary["iterations"] == 4
    assert summary["reached"] is False and summary["time_to_target_s"] is None
    assert summary["target"] == {"bbox": 0.5} and summary["best"]["bbox"] == evals[0]["bbox"]["AP"]
    assert summary["lr"] == pytest.approx(BASE_LR * 4 / 16)  # the linear scaling rule at global batch 4
    mllog = (out / "mllog.txt").read_text()
    assert mllog.startswith(":::MLLOG") and '"key": "run_start"' in mllog and '"key": "run_stop"' in mllog
    assert '"key": "eval_accuracy"' in mllog and '"key": "global_batch_size", "value": 4' in mllog
    ckpt = _weights(out / "checkpoints" / "iter_0000002.pt")
    assert ckpt["iteration"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert (out / "checkpoints" / "iter_0000004.pt").is_file()
    assert not list((out / "checkpoints").glob("*.tmp"))  # atomic writes leave no temp files
    assert sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "4 iterations on 2 ranks" in log  # rank 0's closing line


def test_resume_under_mpirun_equals_uninterrupted_training(run_a, data, tmp_path):
    out_a, _ = run_a
    train_py([*tiny_overrides(data, tmp_path), "eval.at_end=false",
              "--resume", str(out_a / "checkpoints" / "iter_0000002.pt")], np=2, launcher="mpirun")
    a, b = _weights(out_a / "checkpoints" / "iter_0000004.pt"), _weights(tmp_path / "checkpoints" / "iter_0000004.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # weights and BN running statistics, bit for bit
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():  # PMD-LAMB moments and step counters
        for name, value in state.items():
            other = b["optimizer"]["state"][pid][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (pid, name)
    assert a["loader"] == b["loader"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["iteration"]) for r in records] == [("hosts", 2), ("train", 4)]


def test_resume_on_one_plain_process_rescales_or_refuses(run_a, data, tmp_path):
    ckpt = str(run_a[0] / "checkpoints" / "iter_0000002.pt")
    log = train_py([*tiny_overrides(data, tmp_path / "rescaled", iterations=3), "eval.at_end=false", "--resume", ckpt])
    assert "2 -> 1 ranks, global batch 4 -> 2, lr x0.5 by the linear scaling rule" in log
    summary = json.loads((tmp_path / "rescaled" / "summary.json").read_text())
    assert (summary["world_size"] == 1 and summary["iterations"] == 3
            and summary["lr"] == pytest.approx(BASE_LR * 2 / 16))
    with pytest.raises(LaunchError) as info:
        train_py([*tiny_overrides(data, tmp_path / "refused"), "checkpoint.on_world_size_change=refuse",
                  "--resume", ckpt])
    assert "written by a run on 2 ranks (global batch 4); this run has 1 ranks" in str(info.value)
    assert "Launch it with -np 2" in str(info.value)


def test_eval_only_writes_eval_json(run_a, data, tmp_path):
    out_a, _ = run_a
    log = train_py([*tiny_overrides(data, tmp_path), "--eval-only", str(out_a / "checkpoints" / "iter_0000004.pt")])
    result = json.loads((tmp_path / "eval.json").read_text())
    final_eval = [json.loads(line) for line in (out_a / "metrics.jsonl").read_text().splitlines()][-1]
    # One process over the whole val set == the 2-rank sharded evaluation at the end of training.
    assert result["bbox"] == pytest.approx(final_eval["bbox"])
    assert result["world_size"] == 1 and "eval.json" in log


def test_divergence_stops_every_rank_with_the_iteration(data, tmp_path):
    with pytest.raises(LaunchError) as info:
        train_py([*tiny_overrides(data, tmp_path, iterations=20), "solver.optimizer=sgd", "solver.base_lr=1e6",
                  "solver.warmup_iters=0", "checkpoint.interval=0"], np=2)
    message = str(info.value)
    assert "rank 0: diverged at iteration" in message and "rank 1: diverged at iteration" in message
    assert "(lr 250000)" in message  # 1e6 * 4 / 16
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop"] == "diverged" and summary["reached"] is False
    assert f"diverged at iteration {summary['iterations'] + 1} " in summary["failure"]


def test_a_failing_final_evaluation_keeps_the_checkpoint_and_says_why(data, tmp_path):
    """Nothing is lost at the end: the final checkpoint is written before the final evaluation; a
    truncated validation image fails that evaluation, summary.json records why, and a resume after
    the image is repaired only evaluates."""
    import shutil

    source, root = Path(data["train_ann"]).parent.parent, tmp_path / "data"
    shutil.copytree(source, root)
    copy = {key: str(root / Path(path).relative_to(source)) for key, path in data.items()}
    image = min(Path(copy["val_images"]).glob("*"))
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])
    out = tmp_path / "run"
    args = [*tiny_overrides(copy, out, iterations=2), "checkpoint.interval=0"]
    with pytest.raises(LaunchError) as info:
        train_py(args, np=2)
    assert image.name in str(info.value)
    assert (out / "checkpoints" / "iter_0000002.pt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop"] == "eval_failed" and summary["iterations"] == 2
    assert "evaluation at iteration 2 failed" in summary["failure"] and image.name in summary["failure"]
    image.write_bytes(good)
    train_py([*args, "--resume", str(out)], np=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop"] == "max_iters" and summary["iterations"] == 2 and summary["evaluations"] == 1
    assert summary["best"]["bbox"] >= 0.0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from hvdet import checkpoint

    path = checkpoint.path_for(tmp_path, 7)
    checkpoint.save({"iteration": 7}, path)
    assert checkpoint.load(path)["iteration"] == 7 and checkpoint.load(tmp_path)["iteration"] == 7

    def torn_write(obj, f):  # a crash half-way through writing the new version
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"iteration": 8}, path)
    assert checkpoint.load(path)["iteration"] == 7  # the old checkpoint, intact
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # and no temp file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {path} cannot be read"):
        checkpoint.load(path)


def test_used_output_dir_and_missing_checkpoint_are_clear_errors(run_a, data, tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--config", RECIPE, *tiny_overrides(data, run_a[0])],
                         cwd=ROOT, env=rank_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 2  # a configuration error
    assert f"output_dir {run_a[0]} already holds a run (checkpoints); continue it with --resume" in out.stderr


@pytest.mark.slow
def test_missing_checkpoint_is_a_clear_error(data, tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--config", RECIPE, *tiny_overrides(data, tmp_path),
                          "--resume", str(tmp_path / "nope.pt")], cwd=ROOT, env=rank_env(), capture_output=True,
                         text=True, check=False)
    assert out.returncode == 1
    assert f"checkpoint {tmp_path / 'nope.pt'} does not exist" in out.stderr


def test_each_failure_maps_to_its_exit_code_and_one_line():
    """What train.py prints (after "hvdet: rank N: ") and exits with, per kind of failure, without a launch:
    hvdet's own errors carry both, and their builtin base still catches them."""
    from hvdet.atomic import WriteError
    from hvdet.checkpoint import CheckpointError
    from hvdet.cli import _classify
    from hvdet.comm import world
    from hvdet.comm.watchdog import PeerDiedError
    from hvdet.config import ConfigError
    from hvdet.data.coco import DataError
    from hvdet.errors import HvdetError
    from hvdet.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_STALLED
    from hvdet.predict import UsageError
    from hvdet.step import DivergenceError

    errors = {ConfigError: (EXIT_CONFIG, ValueError), UsageError: (EXIT_CONFIG, ValueError),
              DivergenceError: (EXIT_FAILED, RuntimeError), WriteError: (EXIT_FAILED, OSError),
              CheckpointError: (EXIT_FAILED, RuntimeError), DataError: (EXIT_FAILED, ValueError),
              PeerDiedError: (EXIT_FAILED, RuntimeError)}
    for cls, (code, builtin) in errors.items():
        assert issubclass(cls, HvdetError) and issubclass(cls, builtin) and cls.exit_code == code, cls
    for cls in errors:  # the first line only (the traceback file holds the rest)
        line = "config error: f.yaml: bad" if cls is ConfigError else "f.yaml: bad"
        assert _classify(cls("f.yaml: bad\nmore")) == (errors[cls][0], line), cls
    assert _classify(ConfigError()) == (EXIT_CONFIG, "config error: ConfigError")
    assert _classify(TimeoutError("rank 1 stalled\nmore")) == (EXIT_STALLED, "rank 1 stalled")
    assert _classify(KeyboardInterrupt()) == (EXIT_INTERRUPTED, "interrupted (Ctrl-C twice): no checkpoint written")
    peer = world.peer_lost("Horovod has been shut down. This was caused by an exception on one of the ranks")
    peer_line = "a peer rank failed or left (HorovodInternalError: Horovod has been shut down); see its own message"
    assert _classify(peer) == (EXIT_FAILED, peer_line)
    assert _classify(RuntimeError("out of memory")) == (EXIT_FAILED, "RuntimeError: out of memory")


def test_resume_on_another_batch_continues_at_the_same_images_consumed():
    from hvdet.run import loader_state_for, resumed_iteration

    state = {"iteration": 2000, "global_batch": 256, "loader": {"epoch": 3, "position": 40},
             "config": {"solver": {"backward_passes_per_step": 1}}}
    largedet = load_config(ROOT / "configs/largedet_256.yaml")  # length in iterations at batch 16: follows the batch
    assert resumed_iteration(state, largedet, 128) == 4000
    assert resumed_iteration(state, largedet, 256) == 2000
    demo = load_config(ROOT / "configs/synthetic_demo.yaml")  # plain max_iters: iterations as they are
    assert resumed_iteration(state, demo, 128) == 2000
    assert loader_state_for(state, 128) == {"epoch": 3, "position": 80}
    assert loader_state_for(state, 256) == {"epoch": 3, "position": 40}
