"""hvdet.config and hvdet.plan: recipes, validation errors, key=value overrides, the linear scaling rule,
run length."""
import subprocess
import sys

import pytest

from hvdet.config import ConfigError, apply_override, from_dict, load_config
from hvdet.plan import lr_at, plan_run
from tests.harness import ROOT

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
COCO_TRAIN = 118287


def test_every_recipe_loads_and_its_dump_reproduces_it(tmp_path):
    """A run writes its resolved recipe (config.yaml) so that it can be run again: loading that file
    must give the same configuration, for every recipe shipped."""
    from hvdet.config import dump

    names = {p.stem for p in RECIPES}
    assert {"megdet_256", "largedet_256", "largedet_512", "largedet_1056", "largedet_fast_320", "agvm_256",
            "agvm_512", "openimages_640", "synthetic_demo"} <= names
    assert any(n.startswith("maskrcnn_") for n in names)
    for path in RECIPES:
        cfg = load_config(path, ["seed=7", "solver.optimizer_args={trust_coefficient: 0.01}"])
        dump(cfg, tmp_path / f"{path.stem}.yaml")
        assert load_config(tmp_path / f"{path.stem}.yaml") == cfg, path


@pytest.mark.parametrize("recipe,ranks,batch,lr,max_iters,steps", [
    # LargeDet Table 4: batch 320 on 160 GPUs, lr 0.4, steps 2400/3200, stop 3360.
    ("largedet_fast_320", 160, 320, 0.4, 3360, [2400, 3200]),
    # ... on half the ranks: lr halves (linear scaling rule), the schedule doubles (same epochs).
    ("largedet_fast_320", 80, 160, 0.2, 6720, [4800, 6400]),
    # LargeDet 4.1: the 90k/60k/80k schedule at batch 16, shortened in proportion to the batch.
    ("largedet_256", 64, 256, 0.32, 5625, [3750, 5000]),
    ("largedet_512", 64, 512, 0.64, 3938, [2625, 3500]),          # 2813 x 1.4 ("PMD-LAMB (1.4x)")
    ("largedet_1056", 96, 1056, 1.32, 1910, [1273, 1697]),
    # MegDet "normal" policy: epochs 8 / 10 / 11 of COCO at batch 256.
    ("megdet_256", 128, 256, 0.32, 5083, [3697, 4621]),
    ("openimages_640", 64, 640, 0.8, None, None),
    ("maskrcnn_fast_320", 160, 320, 0.4, 4120, [3000, 4000]),
])
def test_recipe_batch_lr_and_length(recipe, ranks, batch, lr, max_iters, steps):
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    plan = plan_run(cfg, ranks, COCO_TRAIN)
    assert plan.global_batch == batch
    assert plan.lr == pytest.approx(lr, rel=1e-12)
    if max_iters is not None:
        assert (plan.max_iters, plan.steps) == (max_iters, steps)


def test_schedule_is_warmup_then_steps():
    cfg = from_dict({"solver": {"base_lr": 0.02, "max_iters": 100, "steps": [60, 80], "warmup_iters": 10,
                                "warmup_start_factor": 0.1}, "data": {"images_per_gpu": 2}})
    plan = plan_run(cfg, 4, 1000)                       # batch 8: lr 0.01
    assert lr_at(cfg, plan, 0) == pytest.approx(0.001)
    assert lr_at(cfg, plan, 5) == pytest.approx(0.01 * (0.1 * 0.5 + 0.5))
    assert [lr_at(cfg, plan, i) for i in (10, 59, 60, 79, 80)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4])


def test_backward_passes_count_in_the_global_batch():
    cfg = from_dict({"solver": {"max_iters": 1, "backward_passes_per_step": 4, "lr_scaling": "linear"},
                     "data": {"images_per_gpu": 2}})
    assert plan_run(cfg, 2, 10).global_batch == 16 and plan_run(cfg, 2, 10).lr == pytest.approx(0.02)
    fixed = from_dict({"solver": {"max_iters": 1, "lr_scaling": "none", "base_lr": 0.5}})
    assert plan_run(fixed, 64, 10).lr == 0.5


def test_overrides_are_parsed_as_yaml():
    raw = {"solver": {"max_iters": 5}}
    for item in ("solver.base_lr=0.1", "solver.steps=[2, 4]", "solver.clip_grad_norm=null", "log.progress=false",
                 "output_dir=runs/x", "target={bbox: 0.5}", "model.overrides.box_batch_size_per_image=64",
                 "solver.cycle_length=null", "data.min_sizes=[96, 128]"):
        apply_override(raw, item)
    cfg = from_dict(raw)
    assert cfg.solver.base_lr == 0.1 and cfg.solver.steps == [2, 4] and cfg.solver.clip_grad_norm is None
    assert cfg.log.progress is False and cfg.output_dir == "runs/x" and cfg.target == {"bbox": 0.5}
    assert cfg.model.overrides == {"box_batch_size_per_image": 64} and cfg.solver.cycle_length is None
    assert cfg.data.min_sizes == [96, 128]
    assert isinstance(from_dict({"solver": {"max_iters": 1, "base_lr": 1}}).solver.base_lr, float)


def _error(raw=None, overrides=(), path=None, tmp_path=None) -> str:
    with pytest.raises(ConfigError) as info:
        if path is not None:
            load_config(path, overrides)
        else:
            raw = dict(raw or {})
            for item in overrides:
                apply_override(raw, item)
            from_dict(raw, source="recipe.yaml")
    return str(info.value)


def test_unknown_keys_name_the_key_the_file_and_the_closest_valid_one(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("solver:\n  max_iters: 4\n  base_lrr: 0.1\n")
    msg = _error(path=path)
    assert str(path) in msg and "'solver.base_lrr'" in msg and "did you mean 'solver.base_lr'" in msg
    assert "did you mean 'model'" in _error({"modle": {}})
    assert "did you mean 'target.bbox'" in _error({"solver": {"max_iters": 1}, "target": {"box": 0.5}})
    assert "valid keys here" in _error({"solver": {"max_iters": 1, "zzzzzz": 1}})


def test_bad_overrides():
    msg = _error({"solver": {"max_iters": 1}}, ["solver.max_itres=3"])
    assert "override 'solver.max_itres=3'" in msg and "did you mean 'solver.max_iters'" in msg
    assert "key=value" in _error({}, ["solver.base_lr"])
    assert "cannot parse" in _error({}, ["solver.steps=[1,"])
    assert "has no sub-keys" in _error({}, ["solver.base_lr.x=1"])
    assert "did you mean 'data'" in _error({}, ["dat.images_per_gpu=1"])
    assert "override 'solver.max_iters=ten': solver.max_iters must be int, got 'ten'" in _error(
        {}, ["solver.max_iters=ten"])
    assert "YAML needs a space after the colon" in _error({}, ["target={bbox:0.5}"])
    assert "override 'target.bbox=high': target.bbox must be float" in _error({}, ["target.bbox=high"])


@pytest.mark.parametrize("raw,expected", [
    ({"solver": {"max_iters": "ten"}}, "solver.max_iters must be int, got 'ten'"),
    ({"solver": {"max_iters": 2.5}}, "solver.max_iters must be int"),
    ({"solver": {"max_iters": 1, "base_lr": True}}, "solver.base_lr must be float"),
    ({"solver": {"max_iters": 1, "steps": [1, "x"]}}, "solver.steps must be list"),
    ({"solver": {"max_iters": 1}, "log": {"progress": "yes"}}, "log.progress must be bool"),
    ({"solver": {"max_iters": 1}, "bn": {"size_images": "32"}}, "bn.size_images must be int or null"),
    ({"solver": {"max_iters": 1}, "model": 3}, "model must be a mapping"),
    ({"solver": {"max_iters": 1, "optimizer": "pmdlam"}}, "did you mean 'pmdlamb'"),
    ({"solver": {"max_iters": 1}, "model": {"norm": "sync"}}, "model.norm must be one of frozen, local, cross_gpu"),
    ({"solver": {}}, "exactly one of solver.max_iters and solver.max_epochs"),
    ({"solver": {"max_iters": 5, "max_epochs": 2}}, "exactly one of"),
    ({"solver": {"max_iters": 5, "step_epochs": [1]}}, "in the unit of the run length"),
    ({"solver": {"max_epochs": 2, "iters_at_batch": 256}}, "leave iters_at_batch unset"),
    ({"solver": {"max_iters": 5}, "target": {"bbox": 36.6}}, "target.bbox is an AP in (0, 1]"),
    ({"solver": {"max_iters": 5}, "target": {"segm": 0.3}}, "needs 'segm' in eval.iou_types"),
    ({"solver": {"max_iters": 5}, "eval": {"iou_types": ["bbox", "segm"]}}, "has no mask head"),
    ({"solver": {"max_iters": 5}, "data": {"images_per_gpu": 0}}, "data.images_per_gpu must be >= 1"),
    ({"solver": {"max_iters": 5, "backward_passes_per_step": 2}, "agvm": {"enabled": True}}, "agvm.enabled needs"),
    # CUDA graphs of the backbone (hvdet.models.cuda_graphs): what a graph cannot do
    ({"solver": {"max_iters": 5, "cuda_graphs": True, "backward_passes_per_step": 2}}, "backward_passes_per_step=1"),
    ({"solver": {"max_iters": 5, "cuda_graphs": True}, "comm": {"gradients": "ddp"}}, "comm.gradients=horovod"),
    ({"solver": {"max_iters": 5, "cuda_graphs": True}, "model": {"norm": "cross_gpu"}, "bn": {"backend": "horovod"},
      "data": {"augmentation": "lsj"}}, "bn.backend torch"),
    ({"solver": {"max_iters": 5, "cuda_graphs": True}, "model": {"norm": "cross_gpu"}}, "data.augmentation=lsj"),
    ({"solver": {"max_iters": 5, "cuda_graphs": True}, "model": {"norm": "cross_gpu"}, "data": {"augmentation": "lsj"},
      "elastic": {"enabled": True}}, "elastic.enabled is not supported"),
])
def test_wrong_values(raw, expected):
    msg = _error(raw)
    assert "recipe.yaml" in msg and expected in msg


def test_bad_files(tmp_path):
    assert "does not exist" in _error(path=tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("solver: [1, 2\n")
    assert "not valid YAML" in _error(path=tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in _error(path=tmp_path / "list.yaml")


def test_train_py_reports_config_errors_in_one_line(tmp_path):
    # Overrides may come before and after the options.
    out = subprocess.run([sys.executable, "train.py", "log.interval=5", "--config", "configs/synthetic_demo.yaml",
                          "solver.base_lrr=0.1"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "hvdet: config error: override 'solver.base_lrr=0.1': unknown key 'solver.base_lrr'; did you mean "
        + "'solver.base_lr'?"]


def test_loading_a_config_does_not_import_torch():
    """A recipe is read and checked without torch (issue 12: config apart from planning)."""
    code = ("import sys; import hvdet.config as c; c.load_config('configs/synthetic_demo.yaml');"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_lengths_in_epochs_follow_the_batch_and_warmup_has_a_floor():
    """Issue 20: warmup, PMD-LAMB's cycle and AGVM's timing given in epochs are converted at the run's global
    batch (the same share of the run at every batch); warmup_iters is a floor in iterations."""
    raw = {"solver": {"max_epochs": 12, "step_epochs": [8, 11], "warmup_epochs": 1, "warmup_iters": 25,
                      "cycle_epochs": 0.7, "base_lr": 0.1, "warmup_start_factor": 0.01},
           "agvm": {"interval_epochs": 0.1, "time_constant_epochs": 1.0}, "data": {"images_per_gpu": 8}}
    cfg = from_dict(raw)
    small = plan_run(cfg, 2, 5120)   # batch 16: 320 iterations an epoch
    assert (small.max_iters, small.steps, small.warmup_iters) == (3840, [2560, 3520], 320)
    assert small.cycle_length == 224 and small.agvm_interval == 32 and small.agvm_momentum == pytest.approx(0.9)
    raw["solver"]["backward_passes_per_step"] = 32
    big = plan_run(from_dict(raw), 2, 5120)  # batch 512: 10 iterations an epoch; warmup at least 25
    assert (big.max_iters, big.steps, big.warmup_iters) == (120, [80, 110], 25)
    assert big.cycle_length == 7 and big.agvm_interval == 1 and big.agvm_momentum == pytest.approx(0.9)
    assert big.lr == pytest.approx(0.1 * 32)
    assert lr_at(from_dict(raw), big, 0) == pytest.approx(3.2 * 0.01) and lr_at(from_dict(raw), big, 25) == 3.2
    # Given in iterations, they stay as written: the recipes' (and the demo's) meaning before issue 20.
    plain = plan_run(from_dict({"solver": {"max_iters": 100, "warmup_iters": 10}}), 8, 1000)
    assert (plain.warmup_iters, plain.cycle_length, plain.agvm_interval, plain.agvm_momentum) == (10, 200, 10, 0.97)


def test_square_root_lr_scaling():
    cfg = from_dict({"solver": {"max_iters": 1, "lr_scaling": "sqrt", "base_lr": 0.1, "backward_passes_per_step": 32},
                     "data": {"images_per_gpu": 8}})
    assert plan_run(cfg, 2, 10).lr == pytest.approx(0.1 * (512 / 16) ** 0.5)  # 0.566 where the linear rule gives 3.2


def test_agvm_timing_from_a_time_constant():
    from hvdet.plan import agvm_timing

    assert agvm_timing(10, 0.97) == (10, 0.97)                  # upstream's, as given
    assert agvm_timing(10, 0.97, None, 333) == (10, pytest.approx(1 - 10 / 333))
    assert agvm_timing(10, 0.97, 5, 4) == (5, 0.0)              # the interval exceeds the time constant
    with pytest.raises(ConfigError, match="agvm.time_constant_epochs must be > 0"):
        from_dict({"solver": {"max_iters": 1}, "agvm": {"time_constant_epochs": 0}})


# ---------------------------------------------------------------------------------------------
# Recipe inheritance (_base_) and hvdet config show (issue 23)
# ---------------------------------------------------------------------------------------------

def _write(folder, name: str, text: str):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_recipes_merge_deeply_later_bases_win_and_overrides_come_last(tmp_path):
    from hvdet.config import dump

    _write(tmp_path, "grand.yaml", "solver: {max_iters: 100, steps: [60, 80], base_lr: 0.1, momentum: 0.8}\n"
           "model: {norm: local, overrides: {a: 1}}\ndata: {min_sizes: [100, 200], max_size: 400}\n")
    _write(tmp_path, "sub/mid.yaml", "_base_: ../grand.yaml\nsolver: {base_lr: 0.2}\n"
           "data: {min_sizes: [300]}\nmodel: {overrides: {b: 2}}\n")          # two levels, path relative to sub/
    _write(tmp_path, "other.yaml", "solver: {base_lr: 0.3}\neval: {interval: 7}\n")
    child = _write(tmp_path, "child.yaml", "_base_: [sub/mid.yaml, other.yaml]\nsolver: {momentum: 0.7}\n")
    cfg = load_config(child)
    assert cfg.solver.base_lr == 0.3                     # the later base wins
    assert (cfg.solver.momentum, cfg.solver.max_iters, cfg.solver.steps) == (0.7, 100, [60, 80])  # merged key by key
    assert cfg.data.min_sizes == [300] and cfg.data.max_size == 400   # a list replaces, its siblings stay
    assert cfg.model.norm == "local" and cfg.model.overrides == {"a": 1, "b": 2} and cfg.eval.interval == 7
    over = load_config(child, ["solver.base_lr=0.5", "data.min_sizes=[64]", "model.overrides.a=3"])
    assert (over.solver.base_lr, over.data.min_sizes, over.model.overrides) == (0.5, [64], {"a": 3, "b": 2})
    # The dump is the whole resolved recipe, without _base_: it runs on its own.
    dump(over, tmp_path / "resolved.yaml")
    assert "_base_" not in (tmp_path / "resolved.yaml").read_text()
    assert load_config(tmp_path / "resolved.yaml") == over


def test_delete_replaces_the_base_mapping(tmp_path):
    _write(tmp_path, "base.yaml", "solver: {max_iters: 100, steps: [60], momentum: 0.8}\ntarget: {bbox: 0.3}\n"
           "model: {overrides: {a: 1}}\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\nsolver: {_delete_: true, max_epochs: 2}\n"
                   "model: {overrides: {_delete_: true, b: 2}}\n")
    cfg = load_config(child)
    assert (cfg.solver.max_iters, cfg.solver.steps, cfg.solver.max_epochs) == (0, [], 2.0)  # merged: "exactly one"
    assert cfg.solver.momentum == 0.9 and cfg.model.overrides == {"b": 2} and cfg.target == {"bbox": 0.3}
    _write(tmp_path, "bad.yaml", "_base_: base.yaml\nsolver: {_delete_: 1}\n")
    assert "solver._delete_ must be true or false" in _error(path=tmp_path / "bad.yaml")


def test_base_errors_name_the_files(tmp_path):
    child = _write(tmp_path, "child.yaml", "_base_: sub/missing.yaml\nsolver: {max_iters: 1}\n")
    msg = _error(path=child)
    assert msg.startswith(f"{child}: _base_ 'sub/missing.yaml' does not exist") and str(tmp_path / "sub") in msg
    _write(tmp_path, "a.yaml", "_base_: sub/b.yaml\n")
    _write(tmp_path, "sub/b.yaml", "_base_: ../a.yaml\n")
    assert _error(path=tmp_path / "a.yaml") == (f"_base_ cycle: {tmp_path / 'a.yaml'} -> {tmp_path / 'sub/b.yaml'} "
                                                f"-> {tmp_path / 'a.yaml'}")
    assert "_base_ must be a file name or a list" in _error(path=_write(tmp_path, "n.yaml", "_base_: 3\n"))
    # A key is reported in the file that wrote it: the child, a base, or an override.
    base = _write(tmp_path, "base.yaml", "solver: {max_iters: 1, optimizer: pmdlam}\n")
    typo = _write(tmp_path, "typo.yaml", "_base_: base.yaml\nsolver: {base_lrr: 0.1, optimizer: sgd}\n")
    assert _error(path=typo) == f"{typo}: unknown key 'solver.base_lrr'; did you mean 'solver.base_lr'?"
    choice = _write(tmp_path, "choice.yaml", "_base_: base.yaml\nsolver: {base_lr: 0.1}\n")
    assert _error(path=choice).startswith(f"{base}: solver.optimizer must be one of")
    assert _error(path=choice, overrides=["solver.optimizer=lamm"]).startswith(
        "override 'solver.optimizer=lamm': solver.optimizer must be one of")
    wrong = _write(tmp_path, "wrong.yaml", "_base_: base.yaml\nsolver: {optimizer: sgd, momentum: high}\n")
    assert _error(path=wrong).startswith(f"{wrong}: solver.momentum must be float")


def test_the_recipes_that_inherit_resolve_as_they_did_when_written_out():
    """configs/largedet_{256,512,1056} and agvm_{256,512} inherit from configs/_base_/: resolved, they are
    the recipes they were when each file spelled out every key (checked against the old files when they
    were rewritten; a few values here)."""
    cfg = {name: load_config(ROOT / "configs" / f"{name}.yaml")
           for name in ("largedet_256", "largedet_512", "largedet_1056", "agvm_256", "agvm_512")}
    for c in cfg.values():
        assert (c.model.arch, c.model.norm, c.model.pretrained_backbone) == (
            "fasterrcnn_resnet50_fpn", "cross_gpu", "weights/resnet50-imagenet.pth")
        assert (c.solver.base_lr, c.solver.reference_batch, c.solver.max_iters, c.solver.steps,
                c.solver.iters_at_batch, c.checkpoint.keep_last) == (0.02, 16, 90000, [60000, 80000], 16, 3)
    l256, l512, l1056, a256, a512 = cfg.values()
    assert (l256.solver.optimizer, l256.solver.weight_decay, l256.solver.alpha, l256.solver.cycle_length) == (
        "pmdlamb", 0.0005, 0.012, 200)
    assert (l256.output_dir, l256.target, l256.data.images_per_gpu, l256.data.num_workers, l256.bn.size_images,
            l256.solver.iterations_scale, l256.solver.warmup_iters, l256.eval.interval, l256.eval.start,
            l256.checkpoint.interval) == ("runs/largedet_256", {"bbox": 0.367}, 4, 4, 32, 1.0, 500, 500, 3000, 500)
    assert (l512.target, l512.data.images_per_gpu, l512.solver.iterations_scale, l512.solver.warmup_iters,
            l512.bn.size_images, l512.eval.interval, l512.checkpoint.interval) == (
        {"bbox": 0.365}, 8, 1.4, 500, 32, 250, 250)
    assert (l1056.bn.size_images, l1056.solver.warmup_iters, l1056.solver.iterations_scale, l1056.eval.start) == (
        33, 300, 1.4, 1200)
    for a in (a256, a512):
        assert (a.solver.optimizer, a.solver.momentum, a.solver.weight_decay, a.solver.per_module) == (
            "sgd", 0.9, 0.0001, True)
        assert (a.agvm.enabled, a.agvm.interval, a.agvm.start_iter, a.agvm.momentum, a.agvm.clamp) == (
            True, 10, 0, 0.97, [0.5, 10.0])
    assert (a256.solver.clip_grad_norm, a256.solver.iterations_scale, a256.eval.interval) == (None, 1.0, 500)
    assert (a512.solver.clip_grad_norm, a512.solver.iterations_scale, a512.data.num_workers) == (35.0, 1.4, 6)
    # Every file under configs/_base_/ is some recipe's base (a base is no recipe: tests glob configs/*.yaml).
    import yaml

    used = {yaml.safe_load(p.read_text()).get("_base_") for p in RECIPES}
    assert {f"_base_/{p.name}" for p in (ROOT / "configs" / "_base_").glob("*.yaml")} <= used


def test_hvdet_config_show_prints_the_resolved_recipe(tmp_path):
    import yaml

    from hvdet.config import to_dict
    from tests.harness import BIN

    out = subprocess.run([str(BIN / "hvdet"), "config", "show", "configs/largedet_512.yaml", "seed=3"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "_base_" not in out.stdout
    shown = yaml.safe_load(out.stdout)
    assert shown == to_dict(load_config(ROOT / "configs" / "largedet_512.yaml", ["seed=3"]))
    assert shown["seed"] == 3 and shown["solver"]["iterations_scale"] == 1.4 and shown["bn"]["size_images"] == 32
    bad = _write(tmp_path, "bad.yaml", f"_base_: {ROOT / 'configs' / 'largedet_512.yaml'}\nsolver: {{momentun: 0.9}}\n")
    out = subprocess.run([str(BIN / "hvdet"), "config", "show", str(bad)], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"hvdet: config error: {bad}: unknown key 'solver.momentun'; did you mean 'solver.momentum'?"]
