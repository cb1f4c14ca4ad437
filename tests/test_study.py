"""benchmarks/study.py, the batch-size study: the settings each cell derives (checked by hand against
LargeDet's protocol), and one tiny real grid end to end under horovodrun (resume, a diverged cell)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import ROOT, rank_env, run_command

sys.path.insert(0, str(ROOT))
from benchmarks import study

# The default grid's structure with numbers this test fixes (the committed grid may be re-sized).
GRID = {
    "recipe": "configs/synthetic_demo.yaml", "ranks": 2, "images_per_gpu": 8, "reference_batch": 16,
    "data": {"root": "data/none", "preset": "hard", "train": 1024, "val": 128, "size": 128, "seed": 0},
    "epochs": 12, "step_epochs": [8, 11], "warmup_epochs": 1, "eval_epochs": 2, "log_epochs": 0.5,
    "batches": [16, 64, 256, 512],
    "optimizers": {"sgd": {"base_lr": 0.02, "overrides": ["solver.optimizer=sgd"]},
                   "pmdlamb": {"base_lr": 0.4, "overrides": ["solver.optimizer=pmdlamb"]},
                   "pmdlamb_agvm": {"base_lr": 0.4, "overrides": ["solver.optimizer=pmdlamb", "agvm.enabled=true"]}},
    "norms": {"local": {"norm": "local"}, "cross_gpu": {"norm": "cross_gpu", "bn_size_images": 16}},
    "overrides": ["target={}"],
}


def _grid_file(tmp_path, **changes) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **changes}))
    return path


def _cells(tmp_path, images=1024, **changes) -> dict:
    grid = study.load_grid(_grid_file(tmp_path, **changes))
    return {c.name: c for c in study.derive_cells(grid, images, tmp_path / "data", tmp_path / "runs")}


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("grid")
    return tmp, _cells(tmp)


@pytest.mark.parametrize("name,per_gpu,passes,bn_size,lr,iters,steps,warmup,eval_every", [
    # batch 16 = 8 images x 2 ranks x 1 pass; 12 epochs of 1024 images = 768 iterations; warmup 1 epoch = 64
    ("b16-sgd-local", 8, 1, 8, 0.02, 768, [512, 704], 64, 128),
    ("b16-pmdlamb-cross_gpu", 8, 1, 16, 0.4, 768, [512, 704], 64, 128),
    # x4 batch: x4 lr (linear scaling rule), 1/4 of the iterations, steps and warmup; 4 backward passes
    ("b64-sgd-local", 8, 4, 8, 0.08, 192, [128, 176], 16, 32),
    ("b256-pmdlamb-local", 8, 16, 8, 6.4, 48, [32, 44], 4, 8),
    ("b512-sgd-cross_gpu", 8, 32, 16, 0.64, 24, [16, 22], 2, 4),
    # AGVM compares one backward pass's gradients: the whole batch in one pass, BN over more images
    ("b64-pmdlamb_agvm-local", 32, 1, 32, 1.6, 192, [128, 176], 16, 32),
    ("b512-pmdlamb_agvm-cross_gpu", 256, 1, 512, 12.8, 24, [16, 22], 2, 4),
    ("b16-pmdlamb_agvm-cross_gpu", 8, 1, 16, 0.4, 768, [512, 704], 64, 128),
])
def test_dry_run_derivations_follow_largedets_protocol(cells, name, per_gpu, passes, bn_size, lr, iters, steps,
                                                       warmup, eval_every):
    tmp_path, cell = cells[0], cells[1][name]
    assert cell.images_per_gpu * 2 * cell.passes == cell.batch == int(name[1:].split("-")[0])
    assert (cell.images_per_gpu, cell.passes, cell.bn_size) == (per_gpu, passes, bn_size)
    assert cell.lr == pytest.approx(lr)
    assert (cell.max_iters, cell.steps, cell.warmup_iters, cell.eval_interval) == (iters, steps, warmup, eval_every)
    assert f"output_dir={tmp_path / 'runs' / name}" in cell.overrides


def test_every_batch_sees_the_same_epochs_and_the_lr_per_image_is_constant(tmp_path):
    cells = _cells(tmp_path, images=1000).values()  # 1000: iterations round up, never fewer images
    for c in cells:
        assert c.max_iters == -(-12 * 1000 // c.batch)  # ceil(epochs x images / batch)
        assert c.warmup_iters == -(-1000 // c.batch)
        assert c.lr / c.batch == pytest.approx(GRID["optimizers"][c.optimizer]["base_lr"] / 16)
    assert len(cells) == 4 * 3 * 2


def test_default_grid_derives_and_dry_run_lists_the_filtered_cells(tmp_path, capsys):
    """The committed grid: at least four batches from 16 to 512+, the four methods, two norms."""
    grid = study.load_grid(study.DEFAULT_GRID)
    assert len(grid.batches) >= 4 and min(grid.batches) <= 16 and max(grid.batches) >= 512
    assert set(grid.optimizers) >= {"sgd", "lamb", "pmdlamb", "pmdlamb_agvm"} and len(grid.norms) == 2
    cells = study.derive_cells(grid, grid.data.train, tmp_path, tmp_path)
    for c in cells:  # the same epochs, to within the one iteration that ceil() may add
        assert 0 <= c.max_iters * c.batch / grid.data.train - grid.epochs < c.batch / grid.data.train
    code = study.main(["--dry-run", "--data", str(tmp_path / "missing"), "--batches", "16", "64",
                       "--optimizers", "sgd", "pmdlamb"])
    out = capsys.readouterr().out
    assert code == 0 and f"8 of {len(cells)} cells" in out
    assert "b64-sgd-local" in out and "b16-pmdlamb-cross_gpu" in out
    assert "b256" not in out and "-lamb-" not in out and "agvm" not in out
    assert not (tmp_path / "missing").exists()  # a dry run writes nothing
    assert study.main(["--dry-run", "--data", str(tmp_path / "missing"), "--batches", "24"]) == 2


def test_grid_file_errors_name_the_key(tmp_path):
    with pytest.raises(study.ConfigError, match="unknown key 'epoch'; did you mean 'epochs'"):
        study.load_grid(_grid_file(tmp_path, epoch=3))
    with pytest.raises(study.ConfigError, match="batch 24 is not a multiple of 8 images x 2 ranks"):
        _cells(tmp_path, batches=[24])
    with pytest.raises(study.ConfigError, match=r"cell_overrides names cells the grid does not have: \['b32-sgd'\]"):
        _cells(tmp_path, cell_overrides={"b32-sgd": ["seed=1"]})


# ---------------------------------------------------------------------------------------------
# One tiny grid, for real: 2 cells on 2 ranks under horovodrun (Gloo), 64-px images
# ---------------------------------------------------------------------------------------------

TINY = {
    "recipe": "configs/synthetic_demo.yaml", "ranks": 2, "images_per_gpu": 2, "reference_batch": 16,
    "data": {"preset": "hard", "train": 16, "val": 4, "size": 64, "seed": 0},
    "epochs": 1, "step_epochs": [], "warmup_epochs": 0.5, "eval_epochs": 1, "log_epochs": 0.5,
    "batches": [4, 8],  # 2 x 2 ranks x 1 pass: 4 iterations; x 2 passes: 2 iterations
    "optimizers": {"sgd": {"base_lr": 0.02, "overrides": ["solver.optimizer=sgd"]}},
    "norms": {"local": {"norm": "local"}},
    "overrides": ["target={}", "data.num_workers=0", "data.min_sizes=[64]", "data.max_size=64",
                  "eval.images_per_gpu=2", "log.progress=false", "checkpoint.interval=0"],
    "cell_overrides": {"b8-sgd-local": ["solver.base_lr=1.0e+30"]},  # a forced divergence (inf in 2 steps)
}


@pytest.mark.multirank
def test_tiny_grid_runs_resumes_and_records_a_divergence(tmp_path):
    grid, runs, data = tmp_path / "tiny.yaml", tmp_path / "runs", tmp_path / "data"
    grid.write_text(yaml.safe_dump(TINY))
    cmd = [sys.executable, "benchmarks/study.py", "--grid", str(grid), "--runs-dir", str(runs), "--data", str(data),
           "--controller", "gloo", "--cell-timeout", "300"]
    first = run_command(cmd, timeout_s=600, env=rank_env())
    assert "[1/2] b4-sgd-local" in first and "[2/2] b8-sgd-local: diverged" in first
    assert (data / "annotations/instances_train.json").is_file()  # the hard set, written when missing

    results = json.loads((runs / "results.json").read_text())
    ok, diverged = results["cells"]
    assert (ok["cell"], ok["status"], ok["iterations"], ok["batch"]) == ("b4-sgd-local", "max_iters", 4, 4)
    assert ok["final_ap"] is not None and ok["curve"][-1][0] == 1.0  # evaluated after its one epoch
    assert (diverged["cell"], diverged["status"], diverged["final_ap"]) == ("b8-sgd-local", "diverged", None)
    assert "diverged at iteration" in diverged["failure"]
    for name in ("b4-sgd-local", "b8-sgd-local"):
        assert (runs / name / "summary.json").is_file() and (runs / name / "train.log").is_file()
        assert json.loads((runs / name / "cell.json").read_text())["command"][0].endswith("horovodrun")
    table = (runs / "results.md").read_text()
    assert "| b4-sgd-local | 4 | sgd | local |" in table and "| diverged |" in table
    for png in ("ap_vs_batch.png", "ap_vs_epoch.png", "diagnostics_vs_batch.png"):
        assert (runs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"backbone", "roi_box"} <= set(ok["diagnostics"]["trust_ratio"])  # log.diagnostics, in the table

    stamps = {n: (runs / n / "summary.json").stat().st_mtime_ns for n in ("b4-sgd-local", "b8-sgd-local")}
    second = run_command(cmd, timeout_s=120, env=rank_env())  # resume: both cells are done, diverged included
    assert second.count("done already (summary.json), skipped") == 2 and "[1/" not in second
    assert stamps == {n: (runs / n / "summary.json").stat().st_mtime_ns for n in stamps}

    (runs / "results.md").unlink()
    assert study.main(["--grid", str(grid), "--runs-dir", str(runs), "--data", str(data), "--report-only"]) == 0
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert [line for line in (runs / "results.md").read_text().splitlines() if line.startswith("|")] == rows


def test_a_cells_diagnostics_are_the_medians_over_its_run_and_are_plotted(tmp_path):
    from benchmarks import study_report

    train = [{"trust_ratio": {"backbone": {"min": 1.0, "median": 10.0, "max": 90.0}, "rpn": {"median": 4.0}},
              "agvm_lr_scale": {"backbone": 1.0, "rpn": 0.5}},
             {"trust_ratio": {"backbone": {"median": 30.0}, "rpn": {"median": 2.0}}},  # AGVM not due here
             {"trust_ratio": {"backbone": {"median": 20.0}, "rpn": {"median": float("inf")}},
              "agvm_lr_scale": {"backbone": 1.0, "rpn": 0.25}},
             {"loss": 1.0}]  # diagnostics off
    got = study_report.diagnostics(train)
    assert got == {"trust_ratio": {"backbone": 20.0, "rpn": 3.0},  # inf left out: median of 4 and 2
                   "agvm_lr_scale": {"backbone": 1.0, "rpn": 0.375}}
    assert study_report.diagnostics([{"loss": 1.0}]) == {}

    rows = [{"cell": f"b{b}-{o}-local", "batch": b, "optimizer": o, "norm": "local", "status": "max_iters",
             "final_ap": 0.1, "curve": [[1.0, 0.1]], "stop_epoch": 1.0,
             "diagnostics": got if o == "pmdlamb_agvm" else {"trust_ratio": got["trust_ratio"]}}
            for b in (16, 64) for o in ("sgd", "pmdlamb_agvm")]
    pngs = [tmp_path / f"{n}.png" for n in ("batch", "epoch", "diagnostics")]
    study_report.plot(rows, *pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
