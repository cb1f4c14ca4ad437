"""hvdet.data.openimages: Open Images CSV boxes to COCO JSON, read back by the training loader."""
import json

import pytest
from PIL import Image

from hvdet.data import CocoDetection, DataError
from hvdet.data.openimages import convert, main, read_classes

BOXES = """ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside
img1,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0
img1,xclick,/m/02,1,0.0,1.0,0.5,1.0,1,0,1,0,0
img2,xclick,/m/02,1,0.25,0.75,0.25,0.75,0,0,0,0,0
img3,xclick,/m/99,1,0.1,0.2,0.1,0.2,0,0,0,0,0
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "img1.jpg")
    Image.new("RGB", (40, 80)).save(tmp_path / "images" / "img2.jpg")
    (tmp_path / "boxes.csv").write_text(BOXES)
    (tmp_path / "classes.csv").write_text("/m/01,Rose\n/m/02,Flower\n/m/99,Tortoise\n")  # no header, as V5-V7
    return tmp_path


def test_boxes_in_pixels_group_of_as_crowd_and_the_loader_reads_it(files):
    data = convert(files / "boxes.csv", read_classes(files / "classes.csv", {"Rose", "Flower"}), files / "images")
    assert [c["name"] for c in data["categories"]] == ["Rose", "Flower"]  # the subset, in the file's order
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [("img1.jpg", 200, 100),
                                                                                    ("img2.jpg", 40, 80)]
    anns = data["annotations"]
    assert anns[0]["bbox"] == pytest.approx([20.0, 20.0, 80.0, 40.0]) and anns[0]["iscrowd"] == 0
    assert anns[1]["bbox"] == pytest.approx([0.0, 50.0, 200.0, 50.0]) and anns[1]["iscrowd"] == 1  # group-of
    assert anns[2]["bbox"] == pytest.approx([10.0, 20.0, 20.0, 40.0])
    (files / "coco.json").write_text(json.dumps(data))
    dataset = CocoDetection(files / "images", files / "coco.json")
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 100, 200) and dataset.num_classes == 3
    # The crowd (group-of) box is no training target; COCOeval still sees it through dataset.coco.
    assert target["boxes"].tolist() == [[20.0, 20.0, 100.0, 60.0]] and target["labels"].tolist() == [1]


def test_bad_files_are_named(files, capsys):
    (files / "bad.csv").write_text(BOXES.replace("0.1,0.5,0.2,0.6", "0.5,0.1,0.2,0.6"))
    with pytest.raises(DataError, match=r"bad.csv, line 2: box .* XMin < XMax"):
        convert(files / "bad.csv", read_classes(files / "classes.csv"), files / "images")
    assert main(["--boxes", str(files / "boxes.csv"), "--classes", str(files / "classes.csv"),
                 "--images", str(files / "images"), "--out", str(files / "out.json")]) == 1  # img3 has no file
    assert "img3.jpg of the box file does not exist" in capsys.readouterr().err
    assert main(["--boxes", str(files / "boxes.csv"), "--classes", str(files / "classes.csv"), "--images",
                 str(files / "images"), "--out", str(files / "out.json"), "--classes-subset", str(files / "keep")]
                if (files / "keep").write_text("Rose\nFlower\n") else []) == 0
    assert len(json.loads((files / "out.json").read_text())["annotations"]) == 3
