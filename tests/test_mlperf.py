"""mllog.txt against MLPerf's own compliance checker (the mlperf-logging package), for a Faster R-CNN
run of the demo recipe: every rule common to all benchmarks passes; what remains is the one rule a
detector MLPerf does not benchmark cannot meet (submission_benchmark must name an MLPerf benchmark)."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, rank_env


@pytest.mark.slow  # a 4-iteration training run in one process: about 10 s
@pytest.mark.parametrize("ruleset", ["5.1.0", "4.1.0", "3.1.0"])
def test_demo_mllog_passes_the_common_rules(tmp_path_factory, ruleset, mllog):
    report = tmp_path_factory.mktemp("checker") / "checker.log"
    out = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--ruleset", ruleset,
                          "--log_output", str(report), str(mllog)], capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    problems = [line for line in text.splitlines() if line.startswith(("WARNING", "ERROR")) and "FAILED" not in line]
    assert problems == ["WARNING -  Required EXACTLY_ONE occurrence of 'submission_benchmark' but found 0"], text
    assert f"training_{ruleset}/common.yaml" in text and f"training_{ruleset}/open_common.yaml" in text


@pytest.fixture(scope="module")
def mllog(tmp_path_factory):
    from hvdet.data.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("mll")
    make_synthetic_coco(root / "data", num_train=8, num_val=2, image_size=64)
    out = root / "run"
    args = [f"data.root={root / 'data'}", "data.images_per_gpu=2", "data.num_workers=0", "data.min_sizes=[64]",
            "data.max_size=64", "solver.max_iters=4", "solver.steps=[]", "solver.warmup_iters=1", "eval.interval=2",
            "eval.start=0", "log.progress=false", f"output_dir={out}"]
    subprocess.run([sys.executable, "train.py", "--config", "configs/synthetic_demo.yaml", *args], cwd=ROOT,
                   env=rank_env(), check=True, capture_output=True)
    lines = (out / "mllog.txt").read_text()
    # Two evaluations: the blocks around them open and close in order.
    assert lines.count('"key": "block_start"') == 2 and lines.count('"key": "block_stop"') == 2
    return out / "mllog.txt"


@pytest.fixture(scope="module")
def retinanet_runs(tmp_path_factory):
    """A RetinaNet run's mllog.txt in each division (4 iterations of the fast CPU variant, one process,
    Adam without weight decay as MLPerf's reference trains it; the open one evaluates in the background)."""
    from hvdet.data.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("retina")
    make_synthetic_coco(root / "data", num_train=8, num_val=2, image_size=64)
    logs = {}
    for division in ("open", "closed"):
        out = root / division
        args = [f"data.root={root / 'data'}", "data.images_per_gpu=2", "data.num_workers=0", "data.min_sizes=[64]",
                "data.max_size=64", "solver.max_iters=4", "solver.steps=[]", "solver.warmup_iters=1",
                "eval.interval=2", "eval.start=0", "log.progress=false", f"output_dir={out}",
                "model.arch=retinanet_resnet18_fpn_fast", "model.norm=local", "solver.optimizer=adam",
                "solver.base_lr=0.0001", "solver.weight_decay=0.0", "log.mlperf_benchmark=retinanet",
                f"log.mlperf_division={division}",
                # open: evaluated in the background, as the MLPerf-like recipe does (its events arrive later)
                f"eval.mode={'background' if division == 'open' else 'sync'}"]
        subprocess.run([sys.executable, "train.py", "--config", "configs/synthetic_demo.yaml", *args], cwd=ROOT,
                       env=rank_env(), check=True, capture_output=True)
        logs[division] = out / "mllog.txt"
    return logs


def _check(ruleset: str, mllog) -> tuple[list[str], str]:
    report = Path(mllog).with_name(f"checker-{ruleset}.log")  # not the checker's default, ./compliance_checker.log
    out = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--ruleset", ruleset,
                          "--log_output", str(report), str(mllog)], capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    return [line for line in text.splitlines() if line.startswith(("WARNING", "ERROR")) and "FAILED" not in line], text


@pytest.mark.slow  # two 4-iteration RetinaNet runs in one process each: about 20 s
@pytest.mark.parametrize("ruleset", ["5.1.0", "5.0.0"])  # the rulesets with a RetinaNet config
def test_retinanet_mllog_passes_the_checker(retinanet_runs, ruleset):
    problems, text = _check(ruleset, retinanet_runs["open"])
    assert problems == [] and "SUCCESS" in text, text
    assert f"training_{ruleset}/open_retinanet.yaml" in text
    # Closed: every rule holds (Adam, no weight decay, warm-up facts, eval metadata) but the quality
    # target, which four iterations on synthetic shapes cannot reach: some eval_accuracy >= 0.340.
    problems, text = _check(ruleset, retinanet_runs["closed"])
    assert f"training_{ruleset}/closed_retinanet.yaml" in text
    assert len(problems) == 1 and "v['value'] >= 0.340" in problems[0], text
