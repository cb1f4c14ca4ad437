"""Background evaluation (``eval.mode: background``): snapshots are evaluated while training goes on.

As MLPerf submissions do, evaluation does not stop training. Each rank starts one evaluator process
(``spawn``: safe with CUDA and with threads) that builds the model once and then, for every
snapshot it is sent (the rank's weights and BN statistics, copied to shared memory), infers its
rank's shard of the val set, exactly as the synchronous :func:`hvdet.eval.coco.evaluate` would. Rank
0's evaluator also scores the gathered detections with pycocotools, so no training rank waits for
COCOeval. The training ranks agree on progress once per iteration with one small collective (two
numbers: "every shard of the oldest snapshot is done" and "rank 0 has its metrics"), then gather the
detections to rank 0, or broadcast the metrics, at the same iteration on every rank.

**Time-to-accuracy rule.** A background result counts at ``snapshot_elapsed_s + eval_s``: the
training wall-clock when its snapshot was taken, plus the evaluation's own time (the slowest rank's
inference of its shard, then the scoring). Waiting in the evaluator's queue and the iterations until
the ranks next agree are not counted; ``known_elapsed_s`` in the eval record says when training
learned the result. The run stops at the first result that meets the target.

    evaluator = start_evaluator(cfg, heartbeat)              # every rank, in set-up: ready, and on
                                                             # CPU hosts training yields to it
    evaluator.submit(iteration, model, snapshot)             # at an evaluation iteration
    for result in evaluator.poll():                          # every iteration while busy (collective)
        ...                                                  # EvalResult: iteration, metrics, eval_s
    evaluator.close()
"""
from __future__ import annotations

import contextlib
import os
import queue
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hvdet import comm
from hvdet.config import Config


@dataclass
class EvalResult:
    """One snapshot's metrics (identical on every rank). ``snapshot``: what the caller passed to
    :meth:`EvaluatorProcess.submit` (elapsed time, epoch, images seen...)."""

    iteration: int
    metrics: dict
    eval_s: float
    snapshot: dict = field(default_factory=dict)


class EvaluatorProcess:
    """This rank's evaluator process and the bookkeeping of the snapshots it has not reported yet."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        ctx = torch.multiprocessing.get_context("spawn")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.jobs, self.scores, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        device = comm.device()
        self.proc = ctx.Process(target=_evaluator_main, name=f"hvdet-eval-rank{rank}", daemon=True,
                                args=(cfg, rank, world_size, device.index, self.jobs, self.scores, self.results))
        self.proc.start()
        self.waiting: deque[tuple[int, dict]] = deque()  # submitted, shards not yet gathered
        self.scoring: deque[tuple[int, dict]] = deque()  # gathered, metrics not yet broadcast
        self.shards: dict[int, tuple] = {}  # iteration -> (image_ids, detections, error, busy_s)
        self.scored: dict[int, tuple] = {}  # rank 0: iteration -> (metrics, error, eval_s)
        self.last_submitted: int | None = None

    def wait_ready(self, timeout_s: float, heartbeat=None) -> None:
        """Block until the evaluator has built its model and dataset: part of set-up, as MLPerf's rules
        allow, so its start-up (importing torch, building the model) does not compete with training."""
        deadline = time.monotonic() + timeout_s
        while True:
            if heartbeat is not None:
                heartbeat("starting the background evaluator")
            try:
                kind, *payload = self.results.get(timeout=0.2)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"the evaluator process of rank {self.rank} died while starting (exit "
                                       f"code {self.proc.exitcode}); its error is above") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the evaluator process of rank {self.rank} was not ready after "
                                       f"{timeout_s:.0f} s") from None
                continue
            if kind == "ready":
                return
            raise RuntimeError(f"the evaluator process of rank {self.rank} failed to start: {payload[-1]}")

    @property
    def busy(self) -> bool:
        """Snapshots are still out; the same on every rank (they change only at collective points)."""
        return bool(self.waiting or self.scoring)

    def submit(self, iteration: int, model: torch.nn.Module, snapshot: dict) -> None:
        """Send the model's weights and buffers at ``iteration`` to the evaluator (not collective)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.jobs.put((iteration, state))
        self.waiting.append((iteration, snapshot))
        self.last_submitted = iteration

    def poll(self) -> list[EvalResult]:
        """The results the ranks agree are complete. Collective: every rank calls it at the same
        iterations while :attr:`busy`. Raises RuntimeError (on every rank) when an evaluation failed."""
        self._collect()
        oldest = self.waiting[0][0] if self.waiting else None
        shard_ready = float(oldest is not None and oldest in self.shards)
        metrics_ready = float(bool(self.scoring) and self.scoring[0][0] in self.scored)
        flags = comm.allreduce_small(torch.tensor([shard_ready, metrics_ready], dtype=torch.float64), op="mean",
                                     name="hvdet.eval.background")
        if flags[0].item() == 1.0:  # every rank's shard of the oldest snapshot: to rank 0 for scoring
            self._gather(oldest)
        if flags[1].item() > 0.0:  # rank 0's evaluator has scored the oldest gathered snapshot
            return [self._broadcast()]
        return []

    def drain(self, heartbeat=None, poll_s: float = 0.02) -> list[EvalResult]:
        """Every outstanding result (collective): used when training has ended."""
        results = []
        while self.busy:
            if heartbeat is not None:
                heartbeat(f"waiting for the background evaluation of iteration {(self.waiting or self.scoring)[0][0]}")
            results += self.poll()
            time.sleep(poll_s)
        return results

    def close(self) -> None:
        """Stop the evaluator process; outstanding snapshots are dropped."""
        if self.proc.is_alive():
            self.jobs.put(None)
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    # -- the steps of poll() ------------------------------------------------------------------

    def _collect(self) -> None:
        while True:
            try:
                kind, iteration, *payload = self.results.get_nowait()
            except queue.Empty:
                break
            (self.shards if kind == "shard" else self.scored)[iteration] = tuple(payload)
        if self.waiting and self.waiting[0][0] not in self.shards and not self.proc.is_alive():
            # A crashed evaluator never answers: report it as this rank's failure of the snapshot.
            message = f"the evaluator process of rank {self.rank} died (exit code {self.proc.exitcode})"
            self.shards[self.waiting[0][0]] = ([], [], message, 0.0)

    def _gather(self, iteration: int) -> None:
        snapshot = self.waiting.popleft()
        gathered = comm.gather_object(self.shards.pop(iteration))
        self.scoring.append(snapshot)
        if gathered is not None:  # rank 0
            if not self.proc.is_alive():
                died = f"the evaluator process of rank 0 died (exit code {self.proc.exitcode})"
                self.scored[iteration] = (None, died, 0.0)
            else:
                self.scores.put((iteration, [g[:3] for g in gathered], max(g[3] for g in gathered)))

    def _broadcast(self) -> EvalResult:
        iteration, snapshot = self.scoring.popleft()
        metrics, error, eval_s = comm.broadcast_object(self.scored.pop(iteration, None), root_rank=0)
        if error:
            raise RuntimeError(f"background evaluation of iteration {iteration} failed: {error}")
        return EvalResult(iteration, metrics, eval_s, snapshot)


def start_evaluator(cfg: Config, heartbeat=None) -> EvaluatorProcess:
    """This rank's evaluator, ready: part of set-up, before the clock starts (as MLPerf allows). On a
    CPU host this training process then yields to it (:func:`yield_to_evaluator`)."""
    evaluator = EvaluatorProcess(cfg, comm.rank(), comm.size())
    try:
        evaluator.wait_ready(comm.timeout_s(), heartbeat)
    except BaseException:
        evaluator.close()
        raise
    if comm.device().type == "cpu":
        yield_to_evaluator(cfg.eval.background_nice)
    return evaluator


def yield_to_evaluator(nice: int) -> int:
    """Lower every thread of this training process by ``nice`` (Horovod's and torch's included: on
    Linux niceness is per thread); the evaluator, started before, keeps its priority. Returns the
    main thread's niceness after.

    Why: time to accuracy counts a background result at its snapshot's time plus its evaluation time,
    so the evaluation that reaches the target is on the critical path. On a CPU host where the
    training ranks already fill the cores, an evaluator sharing a core equally runs at half speed
    (the 2-rank demo here: 1.6 s an evaluation instead of 0.8 s); niced training ranks let it run at
    nearly full speed (a CFS weight of 1024 against 110 at nice 10), while training still fills any
    time the evaluator leaves. Raising niceness needs no privilege, but it cannot be undone: it lasts
    for the training process's life. GPU hosts are not changed (:func:`start_evaluator` decides)."""
    if nice <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs (not Linux): the calling thread, which there is the process
        tids = [0]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    return os.getpriority(os.PRIO_PROCESS, 0)


# ---------------------------------------------------------------------------------------------
# The evaluator process
# ---------------------------------------------------------------------------------------------

def _evaluator_main(cfg: Config, rank: int, world_size: int, device_index: int | None, jobs, scores, results) -> None:
    """Build the model once; then score what rank 0 is sent first (training waits for metrics, not
    for detections), else infer this rank's shard of the next snapshot."""
    from hvdet.builders import build_dataset, build_inference_model
    from hvdet.eval.coco import detect_shard, score

    torch.set_num_threads(1)  # beside a training rank that has the cores
    try:
        if device_index is not None:
            torch.cuda.set_device(device_index)
        dataset = build_dataset(cfg, train=False)
        model = build_inference_model(cfg, dataset.num_classes, world_size)  # Cross-GPU BN as plain BN
    except Exception as err:  # noqa: BLE001 - the training rank raises it (wait_ready)
        results.put(("failed", None, f"{type(err).__name__}: {err}"))
        return
    results.put(("ready", None))
    iou_types = tuple(cfg.eval.iou_types)
    while True:
        try:
            iteration, gathered, busy_s = scores.get_nowait()
        except queue.Empty:
            pass
        else:
            start = time.perf_counter()
            try:
                metrics, error = score(dataset, gathered, iou_types, cfg.eval.scorer), None
            except Exception as err:  # noqa: BLE001 - reported to every rank through the broadcast
                metrics, error = None, str(err)
            results.put(("score", iteration, metrics, error, busy_s + time.perf_counter() - start))
            continue
        try:
            job = jobs.get(timeout=0.02)
        except queue.Empty:
            continue
        if job is None:
            return
        iteration, state = job
        start = time.perf_counter()
        try:
            model.load_state_dict(state)
            ids, dets = detect_shard(model, dataset, rank, world_size, images_per_gpu=cfg.eval.images_per_gpu,
                                     num_workers=0, with_masks="segm" in iou_types)
            error = None
        except Exception as err:  # noqa: BLE001 - gathered to rank 0 and raised on every rank
            ids, dets, error = [], [], f"{type(err).__name__}: {err}"
        results.put(("shard", iteration, ids, dets, error, time.perf_counter() - start))
