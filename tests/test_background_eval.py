"""eval.mode background (hvdet.eval.background): the same AP at the same snapshots as synchronous
evaluation, the time-to-accuracy rule, stopping at the first result that meets the target, and a
failing evaluation reported on every rank. 2 ranks, tiny synthetic data, train.py as a user runs it."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from hvdet.config import ConfigError, load_config
from hvdet.report import load_run
from tests.harness import LaunchError
from tests.test_train import RECIPE, data, tiny_overrides, train_py  # noqa: F401 - data is a fixture


def _evals(out: Path) -> list[dict]:
    return load_run(out).evals


def _run(paths, out, mode, *extra, launcher="horovodrun"):
    args = [*tiny_overrides(paths, out, iterations=6), "eval.interval=2", "eval.start=2", f"eval.mode={mode}",
            "checkpoint.interval=0", *extra]
    train_py(args, np=2, launcher=launcher)
    return _evals(out), json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_background_gives_the_same_ap_at_the_same_snapshots(data, tmp_path, launcher):  # noqa: F811
    sync, _ = _run(data, tmp_path / "sync", "sync", launcher=launcher)
    background, summary = _run(data, tmp_path / "bg", "background", launcher=launcher)
    assert [r["iteration"] for r in sync] == [2, 4, 6]
    assert [r["iteration"] for r in background] == [2, 4, 6]  # all results drained at the end
    for s, b in zip(sync, background, strict=True):
        assert b["bbox"] == s["bbox"], (s["iteration"], s["bbox"], b["bbox"])  # bit-identical weights, same shards
        # The rule: a result counts at its snapshot's wall-clock plus its evaluation time.
        assert b["mode"] == "background" and b["elapsed_s"] == pytest.approx(b["snapshot_elapsed_s"] + b["eval_s"])
        assert b["known_elapsed_s"] >= b["snapshot_elapsed_s"]
    assert summary["evaluations"] == 3 and summary["stop"] == "max_iters" and summary["iterations"] == 6


def test_background_stops_at_the_first_result_that_meets_the_target(data, tmp_path):  # noqa: F811
    evals, summary = _run(data, tmp_path, "background", "target={bbox: 0.000001}", "solver.max_iters=40")
    hit = next(r for r in evals if r["bbox"]["AP"] >= 0.000001)  # any AP above zero, in a few iterations
    assert summary["stop"] == "target" and summary["reached"] and evals[-1] is hit
    assert summary["time_to_target_s"] == pytest.approx(hit["snapshot_elapsed_s"] + hit["eval_s"])
    # Training went on while the snapshot was evaluated, and stopped once the result was known.
    assert hit["iteration"] <= summary["iterations"] < 40
    assert (tmp_path / "checkpoints" / f"iter_{summary['iterations']:07d}.pt").is_file()


def test_a_failing_background_evaluation_stops_every_rank_and_says_why(data, tmp_path):  # noqa: F811
    source, root = Path(data["train_ann"]).parent.parent, tmp_path / "data"
    shutil.copytree(source, root)
    copy = {key: str(root / Path(path).relative_to(source)) for key, path in data.items()}
    image = min(Path(copy["val_images"]).glob("*"))
    image.write_bytes(image.read_bytes()[:50])
    with pytest.raises(LaunchError) as info:
        _run(copy, tmp_path / "run", "background")
    assert image.name in str(info.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop"] == "eval_failed"
    assert "background evaluation of iteration 2 failed" in summary["failure"] and image.name in summary["failure"]


def _same_metrics_in_the_evaluator_process(paths, tmp_path):
    """One process (a world of one): the evaluator process's metrics of a snapshot equal
    hvdet.eval.coco.evaluate's on the same model, with every box kept (score threshold 0), so
    that there are many detections to disagree about."""
    from hvdet import comm
    from hvdet.builders import build_dataset, build_model
    from hvdet.eval.background import EvaluatorProcess
    from hvdet.eval.coco import evaluate

    cfg = load_config(RECIPE, [*tiny_overrides(paths, tmp_path), "model.norm=local",
                               "model.overrides={box_score_thresh: 0.0}", "eval.mode=background"])
    comm.init()
    torch.manual_seed(0)
    val = build_dataset(cfg, train=False)
    model = build_model(cfg, val.num_classes, 1)
    evaluator = EvaluatorProcess(cfg, 0, 1)
    try:
        evaluator.submit(3, model, {"elapsed_s": 1.0})
        (result,) = evaluator.drain()
    finally:
        evaluator.close()
    assert not evaluator.proc.is_alive()
    expected = evaluate(model, val, images_per_gpu=cfg.eval.images_per_gpu, progress=False)
    assert result.iteration == 3 and result.snapshot == {"elapsed_s": 1.0} and result.eval_s > 0
    assert result.metrics == expected and expected["bbox"]["AP"] >= 0.0


@pytest.mark.slow
def test_the_evaluator_process_scores_what_evaluate_scores(data, tmp_path):  # noqa: F811
    _same_metrics_in_the_evaluator_process(data, tmp_path)


@pytest.mark.gpu
def test_the_evaluator_process_scores_what_evaluate_scores_on_cuda(data, tmp_path):  # noqa: F811
    """The evaluator is a spawned process with its own CUDA context on the rank's GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _same_metrics_in_the_evaluator_process(data, tmp_path)


def test_background_evaluation_is_not_for_elastic_runs(tmp_path):
    with pytest.raises(ConfigError, match="eval.mode=background"):
        load_config(RECIPE, ["elastic.enabled=true", "eval.mode=background"])


_NICE_PROBE = """
import os, subprocess, sys, threading
from hvdet.eval.background import yield_to_evaluator
before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # the evaluator, started first
stop = threading.Event()
worker = threading.Thread(target=stop.wait)  # as Horovod's background thread: started before
worker.start()
base = os.getpriority(os.PRIO_PROCESS, 0)
main = yield_to_evaluator(3)
threads = {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}
print(base, main, sorted(threads.values()), os.getpriority(os.PRIO_PROCESS, before.pid))
stop.set(); worker.join(); before.kill()
"""


@pytest.mark.slow
def test_training_threads_yield_to_the_evaluator_and_the_evaluator_keeps_its_priority():
    # In a child: niceness cannot be lowered again, and the pytest process must keep its own.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _NICE_PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split(maxsplit=2)
    base, main = int(out[0]), int(out[1])
    threads, evaluator = out[2].rsplit(maxsplit=1)
    expected = min(19, base + 3)
    assert main == expected
    threads = json.loads(threads)
    assert len(threads) >= 2 and set(threads) == {expected}  # every thread (torch's too), not only the caller
    assert int(evaluator) == base


def test_background_nice_is_a_niceness():
    assert load_config(RECIPE).eval.background_nice == 10
    with pytest.raises(ConfigError, match=r"eval.background_nice is a niceness in \[0, 19\], got 20"):
        load_config(RECIPE, ["eval.background_nice=20"])
