"""hvdet.runlog (RunLogger, StepTimer, MLPerf events) and hvdet.report (table + PNG plots)."""
import json
import math
import subprocess
import sys
import time

import pytest
import torch

from hvdet.report import load_run, main, summary_table
from hvdet.runlog import MLLOG, RunLogger, StepTimer, read_jsonl
from tests.harness import ROOT, rank_env, run_ranks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_fake_run(out_dir, iterations=60, evals=(20, 40, 60), target=0.4, finished=True, diagnostics=False):
    """A run as train.py writes it: AP rises 0.2 -> 0.6, the target is met at the 2nd evaluation;
    with ``diagnostics``, log.diagnostics' trust ratios and AGVM variances in the train records."""
    with RunLogger(out_dir, enabled=True) as log:
        log.mllog(MLLOG.RUN_START)
        log.mllog(MLLOG.GLOBAL_BATCH_SIZE, 8)
        for it in range(1, iterations + 1):
            if it % 5 == 0:
                loss = 2.0 * math.exp(-it / 30)
                losses = {"loss_classifier": 0.6 * loss, "loss_box_reg": 0.4 * loss}
                log.log_train({"iteration": it, "epoch": it // 20, "elapsed_s": 1.5 * it, "lr": 0.02 * min(1, it / 10),
                               "loss": torch.tensor(loss), "losses": losses,
                               "images_per_s": 5.0 + it / 60, "data_s": 0.1, "forward_s": 0.5,
                               "backward_allreduce_s": 0.8, "optimizer_s": 0.1, "max_data_s": 0.15,
                               **(_fake_diagnostics(it) if diagnostics else {})})
            if it in evals:
                ap = 0.2 * (1 + evals.index(it))
                log.log_eval({"iteration": it, "epoch": it // 20, "elapsed_s": 1.5 * it + 3, "eval_s": 3.0,
                              "bbox": {"AP": ap, "AP50": ap + 0.2, "AP75": ap, "APs": -1.0, "APm": ap, "APl": ap}})
                log.mllog(MLLOG.EVAL_ACCURACY, ap, metadata={"epoch_num": it // 20})
        if finished:
            log.mllog(MLLOG.RUN_STOP, metadata={"status": MLLOG.SUCCESS})
            log.write_summary({"target": {"bbox": target}, "reached": True, "time_to_target_s": 63.0,
                               "best": {"bbox": 0.6}, "world_size": 2, "global_batch_size": 8, "images_per_s": 5.5,
                               "train_s": 90.0, "eval_s": 9.0, "iterations": iterations, "arch": "fasterrcnn"})


def _fake_diagnostics(it: int) -> dict:
    modules = ("backbone", "fpn", "rpn", "roi_box")
    return {"trust_ratio": {m: {"min": 10.0 * (k + 1), "median": 50.0 * (k + 1) + it, "max": 900.0 * (k + 1)}
                            for k, m in enumerate(modules)},
            "agvm_variance": {m: 1e-3 * (k + 1) / it for k, m in enumerate(modules)}}


# -- RunLogger ------------------------------------------------------------------------------------

def test_metrics_jsonl_records(tmp_path):
    write_fake_run(tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(train) == 12 and len(evals) == 3
    assert train[0]["iteration"] == 5 and isinstance(train[0]["loss"], float)  # tensor -> float
    assert evals[1]["bbox"]["AP"] == pytest.approx(0.4)
    # Appending: a resumed run continues the same file.
    with RunLogger(tmp_path) as log:
        log.log_train({"iteration": 65, "loss": float("nan"), "lr": float("inf")})
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["iteration"] == 65 and last["loss"] is None and last["lr"] is None  # strict JSON: NaN -> null


def test_record_needs_iteration(tmp_path):
    with RunLogger(tmp_path) as log, pytest.raises(ValueError, match="'iteration'"):
        log.log_eval({"bbox": {"AP": 0.1}})


def test_mllog_lines(tmp_path):
    write_fake_run(tmp_path)
    lines = (tmp_path / "mllog.txt").read_text().splitlines()
    assert lines and all(line.startswith(":::MLLOG ") for line in lines)
    events = [json.loads(line[len(":::MLLOG "):]) for line in lines]
    by_key = {e["key"]: e for e in events}
    assert by_key["run_start"]["event_type"] == "INTERVAL_START"
    assert by_key["run_stop"]["event_type"] == "INTERVAL_END" and by_key["run_stop"]["metadata"]["status"] == "success"
    assert by_key["global_batch_size"]["event_type"] == "POINT_IN_TIME" and by_key["global_batch_size"]["value"] == 8
    accuracies = [e["value"] for e in events if e["key"] == "eval_accuracy"]
    assert accuracies == pytest.approx([0.2, 0.4, 0.6])
    assert by_key["eval_accuracy"]["metadata"]["epoch_num"] == 3
    # MLPerf records the caller's file and line: this test module, not the logger's wrapper.
    assert by_key["run_start"]["metadata"]["file"].endswith("test_report.py")
    assert all(isinstance(e["time_ms"], int) for e in events)


def test_summary_atomic_and_disabled(tmp_path):
    with RunLogger(tmp_path / "run") as log:
        log.write_summary({"reached": False, "best": {"bbox": 0.1}})
        log.write_summary({"reached": True, "best": {"bbox": 0.7}, "time_to_target_s": float("nan")})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == \
        {"reached": True, "best": {"bbox": 0.7}, "time_to_target_s": None}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "mllog.txt", "summary.json"]
    # Ranks other than 0: nothing is created or written.
    with RunLogger(tmp_path / "other", enabled=False) as log:
        log.log_train({"iteration": 1})
        log.mllog(MLLOG.RUN_START)
        assert log.write_summary({"reached": True}) is None
    assert not (tmp_path / "other").exists()


def test_read_jsonl_errors(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "iteration": 1}\n{"type": "tr')  # killed mid-write: skipped
    assert read_jsonl(path) == [{"type": "train", "iteration": 1}]
    path.write_text('{"type": "train", "iteration": 1}\nnot json\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_jsonl(path)


# -- StepTimer ------------------------------------------------------------------------------------

def test_step_timer_means():
    timer = StepTimer()
    for _ in range(4):
        with timer.phase("data_s"):
            time.sleep(0.005)
        timer.add("forward_s", 0.25)
        timer.step()
    window = timer.window()  # a single process: the max over ranks is its own value
    assert window["iterations"] == 4 and window["forward_s"] == pytest.approx(0.25)
    assert 0.005 <= window["data_s"] < 0.2 and window["max_data_s"] == window["data_s"]
    assert window["window_s"] >= 4 * 0.005
    timer.reset()
    assert timer.means() == {} and timer.iterations == 0


def case_timer_max():
    from hvdet import comm

    timer = StepTimer()
    timer.add("data_s", 1.0 + comm.rank())  # rank 1's input pipeline is the slow one
    timer.add("forward_s", 0.5)
    timer.step()
    return timer.window(max_over_ranks=("data_s", "forward_s"))


def test_step_timer_max_over_ranks():
    results = run_ranks("tests.test_report:case_timer_max", np=2, launcher="horovodrun")
    assert [r["data_s"] for r in results] == [1.0, 2.0]
    assert [r["max_data_s"] for r in results] == [2.0, 2.0]
    assert [r["max_forward_s"] for r in results] == [0.5, 0.5]


# -- report ---------------------------------------------------------------------------------------

def test_report_table_and_plots(tmp_path, capsys):
    write_fake_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "time to target" in out and "1 min 03.0 s" in out and "reached" in out
    assert "bbox AP" in out and "0.4" in out and "arch" in out  # eval history + extra summary keys
    for name in ("map_vs_time.png", "loss_lr.png", "throughput.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_report_plots_trust_ratios_and_agvm_variances_when_logged(tmp_path):
    write_fake_run(tmp_path / "plain")
    assert main([str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "plots" / "diagnostics.png").exists()  # nothing logged, no plot
    write_fake_run(tmp_path / "diag", diagnostics=True)
    run = load_run(tmp_path / "diag")
    assert run.train[0]["trust_ratio"]["rpn"]["median"] == 155.0  # 50 x 3 + iteration 5: as written
    assert main([str(tmp_path / "diag")]) == 0
    png = (tmp_path / "diag" / "plots" / "diagnostics.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_report_run_in_progress(tmp_path):
    write_fake_run(tmp_path, iterations=30, evals=(20,), finished=False)
    run = load_run(tmp_path)
    assert run.summary == {} and len(run.evals) == 1
    table = summary_table(run)
    assert "in progress" in table and "bbox 0.2" in table  # best AP taken from the evaluations


def test_report_cli(tmp_path):
    write_fake_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "hvdet.report", str(tmp_path), "--no-plots"], check=False, cwd=ROOT,
                          env=rank_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "global batch size" in proc.stdout
    missing = subprocess.run([sys.executable, "-m", "hvdet.report", str(tmp_path / "nope")], check=False,
                             cwd=ROOT,
                             env=rank_env(), capture_output=True, text=True)
    assert missing.returncode == 2 and "metrics.jsonl does not exist" in missing.stderr


def test_tensorboard_events_are_written_and_read_back(tmp_path):
    """The train and eval records as TensorBoard scalars, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, tensorboard=True) as log:
        for it in (10, 20):
            log.log_train({"iteration": it, "epoch": 0, "loss": 1.0 / it, "losses": {"loss_box_reg": 0.5 / it},
                           "lr": 0.01 * it, "images_per_s": 50.0, "forward_s": 0.1})
        log.log_eval({"iteration": 20, "epoch": 0, "elapsed_s": 3.0, "bbox": {"AP": 0.25, "AP50": 0.5}})
        log.log_event("world", {"iteration": 20, "world_size": 2})  # not a scalar series
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/losses/loss_box_reg", "train/lr", "train/images_per_s", "train/forward_s",
            "eval/bbox/AP", "eval/bbox/AP50", "eval/elapsed_s"} <= tags
    assert not any(t.startswith("world") for t in tags)
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/lr")] == [(10, 0.1), (20, 0.2)]
    assert [(e.step, e.value) for e in events.Scalars("eval/bbox/AP")] == [(20, 0.25)]
    # Opted out (or TensorBoard missing): no folder.
    with RunLogger(tmp_path / "off", tensorboard=False) as log:
        log.log_train({"iteration": 1, "loss": 1.0})
    assert not (tmp_path / "off" / "tensorboard").exists()
