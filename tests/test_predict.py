"""``hvdet predict`` on a tiny synthetic set, with a checkpoint written as train.py writes one.

The model is untrained (seeded): its boxes are arbitrary but real, so the tests look at where they
are drawn, check the JSON against the evaluation's own detections of the same images, and check
the one-line errors through the command line.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from hvdet import checkpoint
from hvdet.builders import build_dataset, build_inference_model
from hvdet.config import load_config, to_dict
from hvdet.data.synthetic import CATEGORIES, make_synthetic_coco
from hvdet.exit_codes import EXIT_CONFIG, EXIT_FAILED
from hvdet.predict import PALETTE, RESULTS_FILE, line_width, main
from tests.harness import ROOT

RECIPE = "configs/synthetic_demo.yaml"  # Cross-GPU BN in the recipe: the inference model has plain BN
IMAGE_PX = 96  # the recipe's test-time resize is 128 px: boxes must come back to 96-px coordinates
NUM_IMAGES = 8
NAMES = {c["id"]: c["name"] for c in CATEGORIES}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """8 val images of 96 px, and a checkpoint of a seeded untrained model with the run's config."""
    root = tmp_path_factory.mktemp("predict")
    paths = make_synthetic_coco(root / "data", num_train=0, num_val=NUM_IMAGES, image_size=IMAGE_PX)
    cfg = load_config(ROOT / RECIPE, [f"data.root={root / 'data'}", f"output_dir={root / 'run'}"])
    torch.manual_seed(0)
    model = build_inference_model(cfg, build_dataset(cfg, train=False).num_classes, world_size=1)
    # The keys of hvdet.run.Run.state_dict that inference reads; checkpoint.save adds the format marker.
    ckpt = checkpoint.save({"iteration": 2, "model": model.state_dict(), "config": to_dict(cfg), "world_size": 1,
                            "global_batch": 8}, checkpoint.path_for(cfg.output_dir, 2))
    return {"cfg": cfg, "model": model, "ckpt": ckpt, "run": root / "run", "root": root, **paths}


def _predict(setup, out, *args) -> int:
    return main(["--checkpoint", str(setup["run"]), "--images", setup["val_images"], "--out", str(out), *args])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
def test_json_schema_and_the_top_box_drawn_where_it_is(setup, tmp_path, capsys):
    # 3 detections an image (a detector kwarg through an override), so most pixels stay untouched.
    assert _predict(setup, tmp_path, "--score", "0", "model.overrides.box_detections_per_img=3") == 0
    assert f"{NUM_IMAGES} images, {3 * NUM_IMAGES} detections" in capsys.readouterr().out
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    files = sorted(p.name for p in (setup["root"] / "data" / "val").iterdir())
    assert len(results) == 3 * NUM_IMAGES
    for d in results:
        assert list(d) == ["image_id", "file_name", "category_id", "bbox", "score"]
        assert files[d["image_id"] - 1] == d["file_name"]  # ids count the sorted files from 1
        assert d["category_id"] in (1, 2, 3) and 0 <= d["score"] <= 1
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= IMAGE_PX and y + h <= IMAGE_PX
    assert sorted(p.name for p in tmp_path.glob("*.png")) == files  # names mirror the inputs

    top = max(results, key=lambda d: d["score"])
    before, after = (_pixels(setup["root"] / "data" / "val" / top["file_name"]), _pixels(tmp_path / top["file_name"]))
    x0, y0 = int(top["bbox"][0]), int(top["bbox"][1])  # draw_bounding_boxes truncates to int
    x1 = min(int(top["bbox"][0] + top["bbox"][2]), IMAGE_PX - 1)
    y1 = min(int(top["bbox"][1] + top["bbox"][3]), IMAGE_PX - 1)
    colour = PALETTE[top["category_id"] - 1]  # synthetic category ids are the labels 1..3
    # The outer line of the left and top edges (the label text starts inside the box): the best box is
    # drawn last, so nothing covers it, and the colour is not the image's.
    border = np.concatenate([after[y0:y1 + 1, x0], after[y0, x0:x1 + 1]])
    assert (border == colour).all()
    original = np.concatenate([before[y0:y1 + 1, x0], before[y0, x0:x1 + 1]])
    assert (original != colour).any(axis=1).mean() > 0.9

    # Every pixel away from the image's boxes and their labels is the input's, bit for bit.
    font, margin = ImageFont.load_default(), line_width(torch.zeros(3, IMAGE_PX, IMAGE_PX)) + 1
    near = np.zeros((IMAGE_PX, IMAGE_PX), dtype=bool)
    for d in (d for d in results if d["file_name"] == top["file_name"]):
        x, y, w, h = (int(v) for v in d["bbox"])
        near[max(y - 1, 0):y + h + 2, max(x - 1, 0):x + w + 2] = True  # the outline (1 px of slack)
        # its label, drawn at (x + margin, y + margin) in the default font
        _, _, right, bottom = font.getbbox(f"{NAMES[d['category_id']]} {d['score']:.2f}")
        near[y:y + margin + bottom + 2, x:x + margin + right + 2] = True
    assert (~near).sum() > 0.2 * IMAGE_PX**2
    assert (after[~near] == before[~near]).all()


def test_json_equals_the_evaluation_detections(setup, tmp_path):
    """An oracle: the evaluation's inference path (hvdet.eval.coco.detect_shard over the recipe's val
    set) gives the same detections, ids (from --ann), category ids and boxes in original pixels."""
    from hvdet.eval.coco import detect_shard

    assert _predict(setup, tmp_path, "--score", "0.99", "--ann", setup["val_ann"]) == 0
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    ids, expected = detect_shard(setup["model"], build_dataset(setup["cfg"], train=False), 0, 1, images_per_gpu=1)
    assert len(ids) == NUM_IMAGES and len(results) == len(expected) > 0
    for got, want in zip(results, expected, strict=True):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3) and got["score"] == pytest.approx(want["score"])


def test_score_threshold_only_filters_the_drawing(setup, tmp_path):
    assert _predict(setup, tmp_path, "--score", "1.01") == 0  # no score reaches it: nothing drawn
    for image in (setup["root"] / "data" / "val").iterdir():
        assert (_pixels(tmp_path / image.name) == _pixels(image)).all()
    assert len(json.loads((tmp_path / RESULTS_FILE).read_text())) > 0  # the JSON keeps every detection


@pytest.mark.slow
def test_a_plain_state_dict_needs_config(setup, tmp_path, capsys):
    plain = tmp_path / "weights.pt"
    torch.save(setup["model"].state_dict(), plain)
    args = ["--checkpoint", str(plain), "--images", setup["val_images"], "--out", str(tmp_path / "out")]
    assert main(args) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err == f"hvdet predict: {plain} holds a plain state_dict without the run's config: pass --config RECIPE\n"
    assert main([*args, "--config", str(ROOT / RECIPE), f"data.root={setup['root'] / 'data'}"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == NUM_IMAGES


def test_checkpoints_without_detector_weights(setup, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    torch.save({"note": "no tensors"}, junk)
    args = ["--images", setup["val_images"], "--out", str(tmp_path / "out"), "--config", str(ROOT / RECIPE)]
    assert main(["--checkpoint", str(junk), *args]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == f"hvdet predict: {junk} holds neither an hvdet checkpoint nor a model state_dict\n"
    other = tmp_path / "other.pt"  # weights, but of another network
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), other)
    assert main(["--checkpoint", str(other), *args, f"data.root={setup['root'] / 'data'}"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith(f"hvdet predict: checkpoint {other} holds another model") and err.count("\n") == 1


def test_an_output_that_would_overwrite_an_input_is_refused(setup, capsys):
    from hvdet.cli import main as hvdet_main  # the subcommand's wiring, in the fast loop

    images, ckpt = setup["val_images"], str(setup["ckpt"])
    assert hvdet_main(["predict", "--checkpoint", ckpt, "--images", images, "--out", images]) == EXIT_CONFIG
    assert "would overwrite the input image" in capsys.readouterr().err


# The command line itself: exit codes and one-line messages on stderr (nothing else there). Each
# is a fresh process that imports torch and torchvision: about 5 s of CPU, hence `slow`.

def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvdet.cli", "predict", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_cli_missing_checkpoint(setup, tmp_path):
    missing = tmp_path / "nope.pt"
    proc = _cli("--checkpoint", missing, "--images", setup["val_images"], "--out", tmp_path / "out")
    assert proc.returncode == EXIT_FAILED
    assert proc.stderr == f"hvdet predict: checkpoint {missing} does not exist\n"


@pytest.mark.slow
def test_cli_corrupt_image_names_the_file_and_writes_no_json(setup, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.open(next((setup["root"] / "data" / "val").iterdir())).save(images / "a.png")
    (images / "b.jpg").write_bytes(b"\x89PNG not really an image" * 10)
    proc = _cli("--checkpoint", setup["ckpt"], "--images", images, "--out", tmp_path / "out")
    assert proc.returncode == EXIT_FAILED
    assert proc.stderr.startswith(f"hvdet predict: cannot decode image file {images / 'b.jpg'}: ")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "out" / RESULTS_FILE).exists()


@pytest.mark.slow
def test_cli_empty_image_folder(setup, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    proc = _cli("--checkpoint", setup["ckpt"], "--images", tmp_path / "empty", "--out", tmp_path / "out")
    assert proc.returncode == EXIT_CONFIG
    assert proc.stderr == (f"hvdet predict: --images {tmp_path / 'empty'}: no .png/.jpg/.jpeg file in this folder "
                           "(subfolders are not read)\n")
