"""Command line: ``hvdet train|eval|config|predict|report|make-synthetic|project`` and ``python train.py``.

    python train.py --config configs/synthetic_demo.yaml [key=value ...] [--resume CKPT] [--eval-only CKPT]
    horovodrun -np 8 python train.py --config configs/largedet_fast_320.yaml output_dir=runs/fast
    hvdet eval --config FILE CKPT [key=value ...]          # = train.py --eval-only CKPT
    hvdet config show RECIPE [key=value ...]               # the resolved recipe (_base_ merged, overrides applied)
    hvdet predict --checkpoint CKPT --images DIR --out DIR  # draw detections, COCO results JSON
    hvdet report RUN_DIR                                    # = python -m hvdet.report RUN_DIR
    hvdet make-synthetic OUT_DIR [...]                      # = python -m hvdet.data.synthetic OUT_DIR
    hvdet project [--metrics RUN_DIR] [--validate] [...]    # = python -m hvdet.timemodel (docs/scaling.md)

The same command runs as one plain process, under ``horovodrun`` and under ``mpirun``. A failure
prints one line on the rank that hit it, naming the cause and the file, rank or iteration; the full
traceback goes to ``output_dir/errors/rank<N>.log``. A launched rank then exits at once (without
Horovod's shutdown, which would wait for peers that may be gone), so the launcher stops the others
instead of leaving them waiting in a collective. Exit codes:

====  ==========================================================================================
0     done (target reached or max_iters)
1     failed: data, checkpoint, divergence, evaluation, disk, or a peer rank failed
2     configuration error (also a usage error)
3     stalled: a collective waited ``comm.timeout_s`` for a peer (hvdet.comm.watchdog)
75    preempted by SIGTERM / SIGINT / SIGUSR1: checkpoint written, continue with ``--resume``
130   interrupted by a second Ctrl-C: stopped at once, no checkpoint
====  ==========================================================================================

``horovodrun`` turns every rank failure into exit 1; ``launch/horovodrun.sh`` and
``launch/mpirun.sh`` pass the first failing rank's code through (ranks append it to the file named
by ``HVDET_EXIT_FILE``).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from pathlib import Path

from hvdet.errors import HvdetError, first_line
from hvdet.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_STALLED
from hvdet.exit_codes import record as record_exit


def _train_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train (or evaluate) a detector with Horovod.")
    parser.add_argument("--config", required=True, help="a YAML recipe, e.g. configs/synthetic_demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides parsed as YAML values, e.g. solver.base_lr=0.1 output_dir=runs/x")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", metavar="CKPT", help="continue a run exactly from this checkpoint")
    mode.add_argument("--eval-only", metavar="CKPT", help="evaluate this checkpoint; writes output_dir/eval.json")
    return parser


def train_main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    args = _train_parser(prog).parse_intermixed_args(argv)  # overrides may come before and after --config
    return _run(args.config, args.overrides, resume=args.resume, eval_only=args.eval_only)


def _run(config_path: str, overrides: list[str], resume: str | None = None, eval_only: str | None = None) -> int:
    from hvdet.config import ConfigError, load_config

    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"hvdet: config error: {err}", file=sys.stderr)
        return record_exit(EXIT_CONFIG)
    from hvdet import comm, engine

    try:
        if eval_only:
            record = engine.evaluate_checkpoint(cfg, eval_only)
            _print_main(comm, _metrics_line(record, f"{cfg.output_dir}/eval.json"))
        else:
            summary = engine.train(cfg, resume=resume)
            _print_main(comm, _summary_line(summary, cfg.output_dir))
            if summary["stop"] == "preempted":
                _print_main(comm, f"hvdet: {summary['failure']}")
                _exit_now(comm, record_exit(EXIT_PREEMPTED))
                return EXIT_PREEMPTED
    except BaseException as err:  # noqa: BLE001 - every failure becomes one line, a log and an exit code
        code = _report(err, comm, cfg.output_dir)
        _exit_now(comm, code)
        return code
    comm.shutdown()
    return 0


def _report(err: BaseException, comm, output_dir: str) -> int:
    """One line on stderr naming the cause, the traceback in ``output_dir/errors/rank<N>.log``;
    returns the exit code (recorded in ``HVDET_EXIT_FILE`` for the launch scripts)."""
    rank = comm.rank() if comm.is_initialized() else 0
    code, cause = _classify(err)
    where = ""
    if code != EXIT_CONFIG:  # a config error needs no traceback (and its output_dir may be another run's)
        log = Path(output_dir) / "errors" / f"rank{rank}.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(err)))
            where = f" (traceback: {log})"
        except OSError:  # the disk may be the problem: the traceback goes to stderr instead
            traceback.print_exception(err)
    # Across hosts the host is named too (a rank number alone sends the user looking for it).
    host = f" on {socket.gethostname()}" if comm.is_initialized() and comm.local_size() < comm.size() else ""
    print(f"hvdet: rank {rank}{host}: {cause}{where}", file=sys.stderr, flush=True)
    return record_exit(code)


def _classify(err: BaseException) -> tuple[int, str]:
    """(exit code, the line naming the cause) of a failed run: hvdet's own errors carry both."""
    from hvdet import comm  # loaded already: _run imports it before anything it reports can fail

    if isinstance(err, HvdetError):
        return err.exit_code, err.one_line()
    name, text = type(err).__name__, first_line(err)
    if isinstance(err, TimeoutError):  # the stall policy's errors name the ranks that stalled
        return EXIT_STALLED, text
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C twice): no checkpoint written"
    if comm.is_horovod_error(err):  # a peer died or left: its own line names the cause
        return EXIT_FAILED, f"a peer rank failed or left ({name}: {text.split('. ')[0]}); see its own message"
    return EXIT_FAILED, f"{name}: {text[:500]}"  # not anticipated: the class name helps to find it


def _exit_now(comm, code: int) -> None:
    """Leave without Horovod's shutdown: it would wait for ranks that may be gone or stuck."""
    if comm.is_initialized() and comm.size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _print_main(comm, line: str) -> None:
    if comm.is_main_process():
        print(line, flush=True)


def _metrics_line(record: dict, where: str) -> str:
    parts = [f"{k} AP {v['AP']:.4f} AP50 {v['AP50']:.4f}" for k, v in record.items()
             if isinstance(v, dict) and "AP" in v]
    return f"eval: {'; '.join(parts)} ({record['eval_s']:.1f} s) -> {where}"


def _summary_line(s: dict, output_dir: str) -> str:
    if s["target"]:
        tta = f"{s['time_to_target_s']:.1f} s" if s["reached"] else "not reached"
        head = f"target {s['target']}: {tta}"
    else:
        head = "no target"
    best = ", ".join(f"{k} AP {v:.4f}" for k, v in s["best"].items()) or "no evaluation"
    ranks = f"{s['world_size']} rank" + ("s" if s["world_size"] != 1 else "")
    return (f"{head}; best {best}; {s['iterations']} iterations on {ranks}, global batch "
            f"{s['global_batch_size']}, {s['images_per_s']:.1f} images/s; train {s['train_s']:.1f} s, "
            f"eval {s['eval_s']:.1f} s -> {output_dir}/summary.json")


def config_main(argv: list[str]) -> int:
    """``hvdet config show RECIPE [key=value ...]``: the resolved recipe as YAML, what a run would write
    as its config.yaml (no torch is loaded)."""
    parser = argparse.ArgumentParser(prog="hvdet config", description="Show a recipe as a run resolves it.")
    show = parser.add_subparsers(dest="action", required=True).add_parser(
        "show", help="print the recipe with its _base_ files merged and the overrides applied")
    show.add_argument("recipe", help="a YAML recipe, e.g. configs/largedet_256.yaml")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from hvdet.config import ConfigError, load_config, to_yaml

    try:
        print(to_yaml(load_config(args.recipe, args.overrides)), end="")
    except ConfigError as err:
        print(f"hvdet: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "eval", "config", "predict", "report", "make-synthetic", "project")
    if not argv or argv[0] not in commands:
        print(f"usage: hvdet {{{','.join(commands)}}} ...  (hvdet COMMAND --help for each)", file=sys.stderr)
        return EXIT_CONFIG
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest, prog="hvdet train")
    if command == "eval":
        parser = argparse.ArgumentParser(prog="hvdet eval", description="Evaluate a checkpoint (COCO metrics).")
        parser.add_argument("--config", required=True)
        parser.add_argument("checkpoint")
        parser.add_argument("overrides", nargs="*", metavar="key=value")
        args = parser.parse_intermixed_args(rest)
        return _run(args.config, args.overrides, eval_only=args.checkpoint)
    if command == "config":
        return config_main(rest)
    if command == "predict":
        from hvdet.predict import main as predict_main

        return predict_main(rest)
    if command == "report":
        from hvdet.report import main as report_main

        return report_main(rest)
    if command == "project":
        from hvdet.timemodel.cli import main as project_main

        return project_main(rest)
    from hvdet.data.synthetic import main as synthetic_main

    return synthetic_main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
