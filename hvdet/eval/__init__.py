"""Evaluation, from inference to a run's results (import the modules; this package imports nothing):

* :mod:`hvdet.eval.coco`: COCO metrics of a model, each rank inferring its shard, rank 0 scoring;
* :mod:`hvdet.eval.results`: a run's evaluation results logged (one path for both modes), the target rule,
  ``--eval-only``;
* :mod:`hvdet.eval.background`: ``eval.mode: background``'s evaluator processes;
* :mod:`hvdet.eval.evaluators`: the one interface the engine uses (``SyncEvaluator``, ``BackgroundEvaluator``).
"""
