"""The optional W&B and MLflow sinks (hvdet.wandb_log, hvdet.mlflow_log), offline: a W&B run in
WANDB_MODE=offline, read back from its .wandb file, and an MLflow file store under the run's folder,
read back by MlflowClient. No network, no login."""
import dataclasses
import importlib.util
import json
import struct
import time
import warnings

import pytest

from hvdet.config import Config, ConfigError, load_config
from hvdet.runlog import RunLogger, read_jsonl
from tests.harness import ROOT

TRAIN = [{"iteration": 2, "epoch": 0, "lr": 0.01, "loss": 1.5, "losses": {"cls": 1.0, "box": 0.5}, "data_s": 0.1},
         {"iteration": 4, "epoch": 0, "lr": 0.02, "loss": 1.25, "losses": {"cls": 0.75, "box": 0.5}, "data_s": 0.1}]
EVAL = {"iteration": 2, "epoch": 0, "eval_s": 3.0, "bbox": {"AP": 0.25, "AP50": 0.5}}  # after iteration 4:
SUMMARY = {"target": {"bbox": 0.2}, "reached": True, "time_to_target_s": 12.5, "iterations": 4, "stop": "target"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline with its own folders under tmp_path; MLflow's file store not allowed beforehand."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)  # restored (or removed again) after the test


def sinks_config(**log) -> Config:
    cfg = Config()
    cfg.log = dataclasses.replace(cfg.log, tensorboard=False, **log)
    return cfg


def log_a_run(out, cfg) -> None:
    with RunLogger(out, config=cfg) as log:
        for record in TRAIN:
            log.log_train(record)
        log.log_eval(EVAL)  # a background evaluation reports an iteration that training has passed
        log.write_summary(SUMMARY)


def wandb_records(path):
    """The records of a .wandb file: a LevelDB-style log (a 7-byte file header, then 32 KiB blocks of
    chunks with a 7-byte header: CRC, length, type full / first / middle / last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block's padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a record still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def finished_wandb_records(out) -> list:
    """The records of output_dir's offline W&B run, once complete: finish() can return before W&B's
    service process has written the file out (seen about 1 run in 10 here)."""
    [path] = (out / "wandb").glob("offline-run-*/run-*.wandb")  # under output_dir, as WANDB_DIR is unset
    deadline = time.monotonic() + 60
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_items(items) -> dict:
    """A history or summary record's items: a key with a "/" comes as nested_key, one part."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_holds_the_records_config_and_summary(tmp_path, offline):
    out = tmp_path / "run_w"
    log_a_run(out, sinks_config(wandb=True, project="hvdet-test"))
    history, summary, run = [], {}, None
    for record in finished_wandb_records(out):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append(wandb_items(record.history.item))
        elif kind == "summary":
            summary.update(wandb_items(record.summary.update))
    assert run.project == "hvdet-test" and run.display_name == "run_w"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["solver"]["base_lr"] == Config().solver.base_lr and config["log"]["wandb"] is True
    train = [{k: v for k, v in h.items() if k.startswith("train/")} for h in history if "train/iteration" in h]
    assert train == [{"train/iteration": 2, "train/lr": 0.01, "train/loss": 1.5, "train/losses/cls": 1.0,
                      "train/losses/box": 0.5, "train/data_s": 0.1},
                     {"train/iteration": 4, "train/lr": 0.02, "train/loss": 1.25, "train/losses/cls": 0.75,
                      "train/losses/box": 0.5, "train/data_s": 0.1}]
    [evaluation] = [h for h in history if "eval/iteration" in h]  # kept, though its iteration is behind
    assert evaluation["eval/iteration"] == 2 and evaluation["eval/bbox/AP"] == 0.25 and evaluation["eval/eval_s"] == 3
    assert summary["summary/reached"] == 1 and summary["summary/time_to_target_s"] == 12.5
    assert summary["summary/target/bbox"] == 0.2 and summary["summary/iterations"] == 4


def test_mlflow_file_store_holds_the_metrics_params_and_summary(tmp_path, offline):
    from mlflow.artifacts import load_dict
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run_m"
    log_a_run(out, sinks_config(mlflow=True, project="hvdet-test"))
    client = MlflowClient((out / "mlruns").as_uri())  # the default tracking URI: a file store in output_dir
    [run] = client.search_runs([client.get_experiment_by_name("hvdet-test").experiment_id])
    assert run.info.run_name == "run_m" and run.info.status == "FINISHED"
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("train/loss", "train/losses/cls", "eval/bbox/AP", "summary/reached")}
    assert history == {"train/loss": [(2, 1.5), (4, 1.25)], "train/losses/cls": [(2, 1.0), (4, 0.75)],
                       "eval/bbox/AP": [(2, 0.25)], "summary/reached": [(4, 1.0)]}
    params = run.data.params
    assert params["solver.base_lr"] == str(Config().solver.base_lr) and params["log.mlflow"] == "True"
    assert params["model.arch"] == Config().model.arch and len(params) > 100  # more than one log_batch
    assert load_dict(f"{run.info.artifact_uri}/summary.json") == SUMMARY


@pytest.mark.parametrize("sink", ["wandb", "mlflow"])
def test_a_sink_asked_for_but_not_installed_is_one_config_error(sink, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == sink else find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/synthetic_demo.yaml", [f"log.{sink}=true"])
    message = str(err.value)
    assert "\n" not in message and f"pip install -e '.[{sink}]'" in message and f"log.{sink}=false" in message
    load_config(ROOT / "configs/synthetic_demo.yaml", [f"log.{sink}=false"])  # off: not needed


def test_a_failing_sink_warns_once_and_the_run_goes_on(tmp_path, offline, monkeypatch):
    from hvdet.mlflow_log import MlflowLog

    def broken(self, scalars, step):
        raise OSError("No space left on device")

    monkeypatch.setattr(MlflowLog, "_metrics", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_a_run(tmp_path / "run", sinks_config(mlflow=True))
    ours = [str(w.message) for w in caught if str(w.message).startswith("hvdet:")]
    assert len(ours) == 1 and "MlflowLog.add failed" in ours[0] and "No space left" in ours[0]
    assert [r["iteration"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [2, 4, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["reached"] is True


def test_a_sink_that_cannot_start_warns_and_is_left_out(tmp_path, offline, monkeypatch):
    import wandb

    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", no_login)
    with pytest.warns(UserWarning, match="no W&B run .*api_key not configured.*WANDB_MODE=offline"):
        log_a_run(tmp_path / "run", sinks_config(wandb=True))
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3


@pytest.mark.slow  # 16-30 s on 2 busy cores
def test_train_py_with_both_sinks_on(tmp_path, offline, monkeypatch):
    """One plain process, 4 iterations: both runs hold the loss of each logged iteration."""
    from mlflow.tracking import MlflowClient

    from hvdet.data.synthetic import make_synthetic_coco
    from tests.test_train import tiny_overrides, train_py

    data = make_synthetic_coco(tmp_path / "data", num_train=8, num_val=2, image_size=64)
    out = tmp_path / "run"
    train_py([*tiny_overrides(data, out), "eval.at_end=false", "checkpoint.interval=0", "log.tensorboard=false",
              "log.wandb=true", "log.mlflow=true"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # train.py's sink set it in its own process only
    client = MlflowClient((out / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("hvdet").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    assert run.info.status == "FINISHED" and "summary/iterations" in run.data.metrics
    history = [wandb_items(r.history.item) for r in finished_wandb_records(out)
               if r.WhichOneof("record_type") == "history"]
    assert [h["train/iteration"] for h in history if "train/loss" in h] == [2, 4]
