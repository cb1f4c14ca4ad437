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
    """The committed grid (issue 20's protocol): batches 16 to 512, SGD / LAMB / PMD-LAMB / AGVM, a pretrained
    start, the LAMB family's anchor swept at batch 16 only, the controls at 512; equal epochs everywhere."""
    grid = study.load_grid(study.DEFAULT_GRID)
    assert study.DEFAULT_GRID.name == "study_large_batch.yaml"
    assert grid.pretrain is not None and set(grid.anchor_sweeps) == {"pmdlamb"}
    assert {grid.optimizers[o].anchor for o in ("lamb", "pmdlamb", "pmdlamb_agvm")} == {"pmdlamb"}
    batches = {b for s in grid.cells for b in s.batches}
    assert min(batches) == 16 and max(batches) >= 512
    assert {s.optimizer for s in grid.cells} >= {"sgd", "lamb", "pmdlamb", "pmdlamb_agvm"}
    assert {s.tag for s in grid.cells} >= {"scratch", "sqrt", "x1.4", "onepass", "bn2", "bn4", "bn8"}
    cells = study.derive_cells(grid, grid.data.train, tmp_path, tmp_path, "pre.pt")
    assert {c.name for c in cells} >= {"b16-pmdlamb-cross_gpu-lr0.05", "b512-sgd-cross_gpu", "b16-sgd-frozen"}
    for c in cells:  # the same epochs, to within the one iteration that ceil() may add
        if not any(o.startswith("solver.iterations_scale=") for o in c.overrides):
            assert 0 <= c.max_iters * c.batch / grid.data.train - grid.epochs < c.batch / grid.data.train
        assert c.warmup_iters >= grid.warmup_iters
        assert ("model.pretrained_backbone=pre.pt" in c.overrides) != (c.tag == "scratch")
    code = study.main(["--dry-run", "--data", str(tmp_path / "missing"), "--runs-dir", str(tmp_path / "runs"),
                       "--batches", "512", "--optimizers", "sgd"])
    out = capsys.readouterr().out
    assert code == 0 and "b512-sgd-cross_gpu " in out and "b512-sgd-cross_gpu-s1" in out and "b16" not in out
    assert "wait for an anchor sweep" in out
    assert not (tmp_path / "missing").exists()  # a dry run writes nothing
    assert study.main(["--dry-run", "--data", str(tmp_path / "missing"), "--batches", "24"]) == 2


SPECS = {
    "anchor_sweeps": {"pmdlamb": [0.1, 0.4]}, "anchor_norm": "cross_gpu",
    "optimizers": {"sgd": {"base_lr": 0.02, "overrides": ["solver.optimizer=sgd"]},
                   "pmdlamb": {"anchor": "pmdlamb", "overrides": ["solver.optimizer=pmdlamb"]},
                   "pmdlamb_agvm": {"anchor": "pmdlamb",
                                    "overrides": ["solver.optimizer=pmdlamb", "agvm.enabled=true"]}},
    "cells": [{"optimizer": "pmdlamb", "norm": "cross_gpu", "batches": [512, 64]},
              {"optimizer": "pmdlamb", "norm": "cross_gpu", "batches": [512], "tag": "sqrt",
               "overrides": ["solver.lr_scaling=sqrt"]},
              {"optimizer": "pmdlamb", "norm": "cross_gpu", "batches": [512], "tag": "x1.4",
               "overrides": ["solver.iterations_scale=1.4"]},
              {"optimizer": "pmdlamb", "norm": "cross_gpu", "batches": [512], "tag": "scratch",
               "overrides": ["model.pretrained_backbone=null"]},
              {"optimizer": "pmdlamb_agvm", "norm": "cross_gpu", "batches": [512]},
              {"optimizer": "pmdlamb", "norm": "cross_gpu", "batches": [512], "tag": "onepass", "one_pass": True},
              {"optimizer": "sgd", "norm": "cross_gpu", "batches": [16, 512], "seeds": [0, 1]},
              {"optimizer": "sgd", "norm": "local", "batches": [16], "tag": "bn2", "images_per_gpu": 2}],
}


def _finish(cell, ap: float | None) -> None:
    """A fake finished run of ``cell``: summary.json and one eval record (None: diverged)."""
    run = Path(cell.output_dir)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"stop": "max_iters" if ap is not None else "diverged",
                                                  "iterations": cell.max_iters}))
    if ap is not None:
        (run / "metrics.jsonl").write_text(json.dumps({"type": "eval", "iteration": cell.max_iters,
                                                       "bbox": {"AP": ap}}) + "\n")


def test_cell_specs_anchor_sweeps_and_controls(tmp_path):
    """Cells given one by one: the anchor sweep's cells come first; the cells that take its winner appear only
    once every sweep cell has finished, with the best final AP's lr (the protocol's one tuning, at batch 16);
    controls change only what they name."""
    grid = study.load_grid(_grid_file(tmp_path, batches=[], **SPECS))

    def derive() -> dict:
        return {c.name: c for c in study.derive_cells(grid, 1024, tmp_path / "data", tmp_path / "runs", "pre.pt")}

    cells = derive()
    assert list(cells)[:2] == ["b16-pmdlamb-cross_gpu-lr0.1", "b16-pmdlamb-cross_gpu-lr0.4"]
    assert not any(c.optimizer.startswith("pmdlamb") for n, c in cells.items() if "-lr" not in n)  # waiting
    assert {"b16-sgd-cross_gpu", "b16-sgd-cross_gpu-s1", "b512-sgd-cross_gpu-s1"} <= set(cells)
    assert "seed=1" in cells["b512-sgd-cross_gpu-s1"].overrides and cells["b512-sgd-cross_gpu-s1"].seed == 1
    bn2 = cells["b16-sgd-local-bn2"]
    assert (bn2.images_per_gpu, bn2.passes, bn2.bn_size) == (2, 4, 2)
    _finish(cells["b16-pmdlamb-cross_gpu-lr0.1"], 0.30)
    assert "b512-pmdlamb-cross_gpu" not in derive()  # one sweep cell left
    _finish(cells["b16-pmdlamb-cross_gpu-lr0.4"], 0.25)
    cells = derive()
    assert study.anchors(grid, [c for c in cells.values() if "-lr" in c.name], 1024) == {"pmdlamb": 0.1}
    main, sqrt, longer = (cells[f"b512-pmdlamb-cross_gpu{t}"] for t in ("", "-sqrt", "-x1.4"))
    assert main.lr == pytest.approx(0.1 * 32) and sqrt.lr == pytest.approx(0.1 * 32 ** 0.5)
    assert (main.max_iters, longer.max_iters, longer.steps) == (24, 34, [22, 31])  # LargeDet's 1.4x
    assert "model.pretrained_backbone=pre.pt" in main.overrides
    assert cells["b512-pmdlamb-cross_gpu-scratch"].overrides[-1] == "model.pretrained_backbone=null"
    agvm, control = cells["b512-pmdlamb_agvm-cross_gpu"], cells["b512-pmdlamb-cross_gpu-onepass"]
    assert (agvm.images_per_gpu, agvm.passes, agvm.bn_size) == (control.images_per_gpu, control.passes,
                                                                control.bn_size) == (256, 1, 512)
    assert cells["b16-pmdlamb-cross_gpu-lr0.1"].label == "pmdlamb"  # the winner is the 16-point of its line
    assert cells["b16-pmdlamb-cross_gpu-lr0.4"].label == "pmdlamb+lr0.4"


def test_noise_threshold_from_the_seed_pairs():
    from benchmarks import study_report

    rows = [{"cell": "b16-sgd-cross_gpu", "seed": 0, "final_ap": 0.300},
            {"cell": "b16-sgd-cross_gpu-s1", "seed": 1, "final_ap": 0.285},
            {"cell": "b512-sgd-cross_gpu", "seed": 0, "final_ap": 0.100},
            {"cell": "b512-sgd-cross_gpu-s1", "seed": 1, "final_ap": None},   # not finished: no pair yet
            {"cell": "b64-sgd-cross_gpu", "seed": 0, "final_ap": 0.2},
            # the anchor sweep's winner (seed 0, named for the sweep) and its second seed
            {"cell": "b16-pmdlamb-cross_gpu-lr0.4", "seed": 0, "base_lr": 0.4, "final_ap": 0.359},
            {"cell": "b16-pmdlamb-cross_gpu-s1", "seed": 1, "base_lr": 0.4, "final_ap": 0.356}]
    got = study_report.noise(rows)
    assert [p["cell"] for p in got["pairs"]] == ["b16-sgd-cross_gpu", "b16-pmdlamb-cross_gpu-lr0.4"]
    assert got["max_range"] == pytest.approx(0.015) and got["threshold"] == pytest.approx(0.03)
    assert study_report.noise(rows[2:5])["threshold"] == 0.02  # no pair: the floor


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


@pytest.mark.multirank
def test_tiny_grid_pretrains_once_sweeps_the_anchor_and_uses_it(tmp_path):
    """Issue 20's protocol end to end, tiny: the pretraining run (another seed of the set), then a two-lr anchor
    sweep at the reference batch, then the cell that takes the winner, loading the pretrained backbone body."""
    tiny = {**TINY, "batches": [], "reference_batch": 4, "cell_overrides": {},
            "pretrain": {"data_root": str(tmp_path / "pre_data"), "data_seed": 1, "batch": 4, "epochs": 1,
                         "overrides": ["solver.optimizer=sgd", "solver.base_lr=0.02"]},
            "anchor_sweeps": {"sgd": [0.01, 0.02]}, "anchor_norm": "local",
            "optimizers": {"sgd": {"anchor": "sgd", "overrides": ["solver.optimizer=sgd"]}},
            "cells": [{"optimizer": "sgd", "norm": "local", "batches": [8]}]}
    grid, runs, data = tmp_path / "tiny.yaml", tmp_path / "runs", tmp_path / "data"
    grid.write_text(yaml.safe_dump(tiny))
    cmd = [sys.executable, "benchmarks/study.py", "--grid", str(grid), "--runs-dir", str(runs), "--data", str(data),
           "--controller", "gloo", "--cell-timeout", "300"]
    out = run_command(cmd, timeout_s=600, env=rank_env())
    assert "pretraining the starting point (4 iterations at batch 4)" in out
    assert (tmp_path / "pre_data/annotations/instances_train.json").is_file()
    assert "[1/2] b4-sgd-local-lr0.01" in out and "[3/3] b8-sgd-local:" in out  # the third appears after the sweep
    results = json.loads((runs / "results.json").read_text())
    rows = {r["cell"]: r for r in results["cells"]}
    assert set(rows) == {"b4-sgd-local-lr0.01", "b4-sgd-local-lr0.02", "b8-sgd-local"}
    sweep = {lr: rows[f"b4-sgd-local-lr{lr}"]["final_ap"] for lr in ("0.01", "0.02")}
    winner = max(sweep, key=lambda lr: (sweep[lr], -float(lr)))
    assert rows["b8-sgd-local"]["base_lr"] == float(winner) and rows["b8-sgd-local"]["lr"] == 2 * float(winner)
    pretrain = results["grid"]["pretrain"]
    assert pretrain["status"] == "max_iters" and len(pretrain["sha256"]) == 64
    config = yaml.safe_load((runs / "b8-sgd-local" / "config.yaml").read_text())
    assert config["model"]["pretrained_backbone"] == pretrain["checkpoint"]
    again = run_command(cmd, timeout_s=120, env=rank_env())
    assert "pretraining" not in again and again.count("done already") == 3


def test_finished_cells_are_archived_and_restored_in_a_new_checkout(tmp_path):
    """A study longer than a session: each finished cell's small files go to the archive (committed); a fresh
    checkout (no runs directory) restores them, so only unfinished cells run again."""
    grid = study.load_grid(_grid_file(tmp_path, batches=[], **SPECS))
    cells = {c.name: c for c in study.derive_cells(grid, 1024, tmp_path / "data", tmp_path / "runs", "pre.pt")}
    _finish(cells["b16-pmdlamb-cross_gpu-lr0.1"], 0.30)
    Path(cells["b16-sgd-cross_gpu"].output_dir).mkdir(parents=True)  # started, not finished: not archived
    archive = tmp_path / "archive"
    assert study.archive_cells(list(cells.values()), archive) == 1
    assert sorted(p.name for p in (archive / "cells/b16-pmdlamb-cross_gpu-lr0.1").iterdir()) == [
        "metrics.jsonl", "summary.json"]
    import shutil

    shutil.rmtree(tmp_path / "runs")  # a new checkout
    assert study.restore_cells(list(cells.values()), archive) == ["b16-pmdlamb-cross_gpu-lr0.1"]
    row = study.collect(cells["b16-pmdlamb-cross_gpu-lr0.1"], 1024)
    assert (row["status"], row["final_ap"]) == ("max_iters", 0.30)
    assert study.restore_cells(list(cells.values()), archive) == []  # done already


def test_the_controls_of_a_failure_run_at_the_first_failing_batch(tmp_path):
    """SGD's half-lr / 4x-warmup controls (LargeDet Table 1) run at the first batch where its plain cells
    diverge or lose more than failure_loss against batch 16; they wait until those cells are done, and are
    not needed when nothing fails."""
    specs = {"optimizers": {"sgd": SPECS["optimizers"]["sgd"]}, "failure_loss": 0.05,
             "cells": [{"optimizer": "sgd", "norm": "cross_gpu", "batches": [16, 64, 256, 512]},
                       {"optimizer": "sgd", "norm": "cross_gpu", "at_first_failure": True, "tag": "halflr",
                        "overrides": ["solver.base_lr=0.01"]}]}
    grid = study.load_grid(_grid_file(tmp_path, batches=[], **specs))

    def derive() -> dict:
        return {c.name: c for c in study.derive_cells(grid, 1024, tmp_path / "data", tmp_path / "runs")}

    cells = derive()
    assert not any("halflr" in n for n in cells)  # waiting
    for batch, ap in ((16, 0.30), (64, 0.29), (256, 0.27)):  # 256: 10% below batch 16
        _finish(cells[f"b{batch}-sgd-cross_gpu"], ap)
    assert not any("halflr" in n for n in derive())  # 512 not done yet
    _finish(cells["b512-sgd-cross_gpu"], None)  # diverged
    control = derive()["b256-sgd-cross_gpu-halflr"]
    assert control.base_lr == 0.01 and control.lr == pytest.approx(0.16)


def test_a_preempted_cell_is_not_done(tmp_path):
    """Stopping the study sends its cell SIGTERM, and train.py writes a "preempted" summary: that cell is
    neither done, nor archived, and runs again."""
    run = tmp_path / "b64-x"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"stop": "preempted", "iterations": 56}))
    assert not study.done(run)
    (run / "summary.json").write_text(json.dumps({"stop": "diverged"}))
    assert study.done(run)
