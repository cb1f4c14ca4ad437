"""Time-to-train model for N GPUs: step time, scaling efficiency and time to a target from a measured
per-GPU step, the model's gradient bytes under Horovod's tensor fusion, Cross-GPU BN's collectives and
the interconnect. Torch-free (it runs where torch is not installed).

* :mod:`hvdet.timemodel.model`: the formulas (ring / hierarchical / tree allreduce, Horovod's fusion
  loop and its overlap with backward, CGBN's latency-bound collectives), pure functions on dataclasses;
* :mod:`hvdet.timemodel.presets`: DGX-2 / DGX A100 / DGX H100 / this CPU VM, model sizes, reference
  steps, each with its source;
* :mod:`hvdet.timemodel.validation`: the model against MegDet, LargeDet, Horovod and MLPerf runs;
* :mod:`hvdet.timemodel.measured`: steps read from a run or a benchmark, and the 1 -> N rank check;
* :mod:`hvdet.timemodel.cli`: ``hvdet project`` (= ``python -m hvdet.timemodel``).

See docs/scaling.md. Import from the submodules (``from hvdet.timemodel.model import step``).
"""
