"""The demo's time to accuracy with synchronous and with background evaluation (eval.mode).

    .venv/bin/python benchmarks/eval_modes.py [--rounds 2] [--np 2 1]

``launch/demo.sh`` (the demo recipe, horovodrun's own controller) with ``eval.mode=sync``,
``eval.mode=background`` (the training ranks yield to their evaluators: ``eval.background_nice`` 10)
and background with ``eval.background_nice=0`` (``background_equal``), alternating, ``--rounds``
times for each number of training ranks in ``--np`` (``--modes`` picks some). With 2 ranks on this
2-core machine every core already trains; with 1 rank one core is free for the evaluator, as a GPU's
spare capacity would be. Reports time to target (the rule of each
mode: docs/training.md), iterations, images/s and the AP of every evaluation (same snapshots, same
AP: evaluation does not touch training's random numbers). Results: benchmarks/results/eval_modes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import ROOT, provenance

# name -> the demo's overrides. background: the training ranks yield to their evaluators (the default
# eval.background_nice, 10); background_equal: they keep their priority (eval.background_nice=0).
MODES = {"sync": ["eval.mode=sync"],
         "background": ["eval.mode=background"],
         "background_equal": ["eval.mode=background", "eval.background_nice=0"]}


def demo(np_: int, mode: str, run_dir: Path) -> dict:
    env = {**os.environ, "NP": str(np_), "RUN": str(run_dir)}
    proc = subprocess.run(["bash", "launch/demo.sh", *MODES[mode], "log.progress=false"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 1):  # 1: target not reached, still a result
        raise RuntimeError(f"demo NP={np_} eval.mode={mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return demo_result(run_dir)


def demo_result(run_dir: Path) -> dict:
    """A demo run's time to target, throughput and the AP (and evaluation time) of every evaluation."""
    from hvdet.report import load_run

    run = load_run(run_dir)
    s = run.summary
    return {**{k: s[k] for k in ("time_to_target_s", "reached", "iterations", "images_per_s", "train_s", "eval_s")},
            "ap": {str(r["iteration"]): r["bbox"]["AP"] for r in run.evals},
            "eval_seconds": {str(r["iteration"]): r["eval_s"] for r in run.evals}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--np", type=int, nargs="+", default=[2, 1])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_modes.json"))
    args = p.parse_args()
    before = provenance()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hvdet-eval-modes-") as tmp:
        for np_ in args.np:
            runs = {m: [] for m in args.modes}
            for r in range(args.rounds):
                for mode, done in runs.items():
                    done.append(demo(np_, mode, Path(tmp) / f"np{np_}-{mode}-{r}"))
                    print(f"np {np_} {mode:10s} round {r + 1}: time to target {done[-1]['time_to_target_s']} s, "
                          f"{done[-1]['iterations']} iterations, {done[-1]['images_per_s']:.1f} images/s "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
            med = {m: statistics.median(x["time_to_target_s"] or float("inf") for x in v) for m, v in runs.items()}
            ap = [x["ap"] for v in runs.values() for x in v]
            results[f"np{np_}"] = {"runs": runs, "time_to_target_s_median": med,
                                   **{f"{m} / sync": med[m] / med["sync"] for m in med if m != "sync"},
                                   "same_ap_at_same_snapshots": all(a[k] == ap[0][k] for a in ap for k in ap[0])}
    doc = {"benchmark": "make demo: eval.mode sync vs background", "rounds": args.rounds,
           "machine": f"{os.uname().machine}, {os.cpu_count()} cores", "provenance_before": before,
           "provenance_after": provenance(), "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for key, r in results.items():
        med = r["time_to_target_s_median"]
        ratios = ", ".join(f"{m} {t:.1f} s" + (f" ({t / med['sync']:.2f}x)" if m != "sync" else "")
                           for m, t in med.items())
        print(f"{key}: {ratios}; same AP at the same snapshots: {r['same_ap_at_same_snapshots']}")


if __name__ == "__main__":
    main()
