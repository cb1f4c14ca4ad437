"""MLflow: the train / eval scalars, the resolved config and the summary of a run, on rank 0.

    log.mlflow: true                # pip install -e '.[mlflow]' (mlflow-skinny)
    log.project: hvdet              # the MLflow experiment; the run's name is output_dir's last folder
    log.mlflow_tracking_uri: ""     # "": file:<output_dir>/mlruns, a local file store (no server)

Off by default. Metrics have the names TensorBoard gives them (``train/loss``, ``eval/bbox/AP``, ...)
with step = iteration; params are the resolved config, flattened (``solver.base_lr``); the summary is
``summary/*`` metrics and a ``summary.json`` artifact. Look at a local store with
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/<name>/mlruns`` (the full ``mlflow`` package).
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

from hvdet.tensorboard_log import flatten, summary_scalars

PARAMS_PER_CALL = 100  # a tracking server takes at most 100 params per log_batch


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"solver": {"base_lr": 0.02}}`` -> ``{"solver.base_lr": "0.02"}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class MlflowLog:
    def __init__(self, client, run_id: str):
        self._client, self._run_id = client, run_id

    @classmethod
    def open(cls, folder: str | os.PathLike, experiment: str, tracking_uri: str, config: dict) -> MlflowLog | None:
        """An MLflow run named after ``folder`` with ``config`` as params; None (with a warning) if it fails."""
        uri = tracking_uri or (Path(folder).resolve() / "mlruns").as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses a file store unless asked: it prefers a database, which needs SQLAlchemy.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient  # installed: the config check said so (hvdet.config_checks)

            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id, run_name=Path(folder).name).info.run_id
            params = [Param(k, v) for k, v in flat_params(config).items()]
            for i in range(0, len(params), PARAMS_PER_CALL):
                client.log_batch(run_id, params=params[i:i + PARAMS_PER_CALL])
        except Exception as err:  # noqa: BLE001 -- no server, a bad URI, ...: the run goes on without MLflow
            warnings.warn(f"hvdet: no MLflow run at {uri} ({err}); set log.mlflow_tracking_uri, or log.mlflow=false",
                          stacklevel=2)
            return None
        return cls(client, run_id)

    def _metrics(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now_ms, step) for k, v in scalars.items()])

    def add(self, kind: str, record: dict) -> None:
        self._metrics(flatten(record, kind), int(record["iteration"]))

    def summary(self, summary: dict) -> None:
        self._metrics(summary_scalars(summary), int(summary.get("iterations") or 0))
        self._client.log_dict(self._run_id, summary, "summary.json")

    def close(self) -> None:
        self._client.set_terminated(self._run_id)
