"""`captions`: tsv, jsonl, COCO captions json and Karpathy-split json."""

import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from mmkd.data import create_dataset
from mmkd_core.errors import MmkdError


def _images(d: Path, *names: str) -> None:
    for k, name in enumerate(names):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (40 * k, 0, 0)).save(d / name)


def test_tsv(tmp_path):
    _images(tmp_path, "img/a.png", "img/b.png")
    f = tmp_path / "caps.tsv"
    f.write_text("image\tcaption\nimg/a.png\ta red thing\nimg/b.png\ta  black   thing \n\nimg/a.png\tred again\n")
    ds = create_dataset("captions", str(f))
    assert len(ds) == 3 and ds.num_images == 2 and ds.modality == "image_text"
    assert [ds.text(i) for i in range(3)] == ["a red thing", "a black thing", "red again"]
    assert [ds.image_id(i) for i in range(3)] == [0, 1, 0]
    assert ds.image(2).getpixel((0, 0)) == (0, 0, 0) and ds.image(1).getpixel((0, 0)) == (40, 0, 0)
    assert pickle.loads(pickle.dumps(ds)).text(1) == "a black thing"
    fp = ds.fingerprint()
    # moved with its images: the same content
    (tmp_path / "moved").mkdir()
    for name in ("img", "caps.tsv"):
        (tmp_path / name).rename(tmp_path / "moved" / name)
    f = tmp_path / "moved" / "caps.tsv"
    assert create_dataset("captions", str(f)).fingerprint() == fp
    text = f.read_text()
    f.write_text(text.replace("red again", "red agaiN"))  # one byte of one caption
    assert create_dataset("captions", str(f)).fingerprint() != fp
    f.write_text(text)
    assert create_dataset("captions", str(f)).fingerprint() == fp
    _images(tmp_path / "moved", "img/b.png", "img/a.png")  # swap the pixels, same names
    assert create_dataset("captions", str(f)).fingerprint() != fp


def test_tsv_errors(tmp_path):
    _images(tmp_path, "a.png")
    f = tmp_path / "caps.tsv"
    f.write_text("a.png\tfine\nmissing.png\tgone\n")
    with pytest.raises(MmkdError, match=r"caps\.tsv:2.*missing\.png"):
        create_dataset("captions", str(f))
    f.write_text("a.png\tfine\na.png no tab here\n")
    with pytest.raises(MmkdError, match=r"caps\.tsv:2"):
        create_dataset("captions", str(f))
    with pytest.raises(MmkdError, match="nowhere does not exist"):
        create_dataset("captions", str(tmp_path / "nowhere"))
    with pytest.raises(MmkdError, match=r"test\.tsv.*dataset_coco\.json"):
        create_dataset("captions", str(tmp_path), split="test")


def test_jsonl_and_directory_root(tmp_path):
    _images(tmp_path, "x.jpg", "y.jpg")
    lines = [{"image": "x.jpg", "caption": "one"}, {"image": "y.jpg", "captions": ["two", "three"]}]
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(o) for o in lines) + "\n")
    ds = create_dataset("captions", str(tmp_path), split="validation")
    assert ds.split == "val" and [ds.text(i) for i in range(3)] == ["one", "two", "three"]
    assert [ds.image_id(i) for i in range(3)] == [0, 1, 1]
    (tmp_path / "val.jsonl").write_text('{"image": "x.jpg", "caption": "one"}\n{"image": "x.jpg"\n')
    with pytest.raises(MmkdError, match=r"val\.jsonl:2"):
        create_dataset("captions", str(tmp_path), split="val")


def test_coco_json(tmp_path):
    _images(tmp_path, "val2017/1.jpg", "val2017/2.jpg")
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    data = {
        "images": [{"id": 7, "file_name": "1.jpg"}, {"id": 9, "file_name": "2.jpg"}],
        "annotations": [
            {"image_id": 9, "id": 1, "caption": "second image"},
            {"image_id": 7, "id": 2, "caption": "first image\n"},
            {"image_id": 9, "id": 3, "caption": "second, again"},
        ],
    }
    ann.write_text(json.dumps(data))
    ds = create_dataset("coco", str(tmp_path), split="val")  # finds annotations/ and ../val2017
    assert [ds.text(i) for i in range(3)] == ["first image", "second image", "second, again"]
    assert [ds.image_id(i) for i in range(3)] == [0, 1, 1]
    assert ds.image_path(1).endswith("val2017/2.jpg")
    data["annotations"][0]["image_id"] = 5
    ann.write_text(json.dumps(data))
    with pytest.raises(MmkdError, match="captions_val2017.json.*image_id"):
        create_dataset("captions", str(ann))
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "3.jpg"}], "annotations": [
        {"image_id": 1, "caption": "x"}]}))  # fmt: skip
    with pytest.raises(MmkdError, match="captions_val2017.json.*3.jpg"):
        create_dataset("captions", str(ann), images_dir=str(tmp_path / "val2017"))
    ann.write_text("{not json")
    with pytest.raises(MmkdError, match="captions_val2017.json"):
        create_dataset("captions", str(ann))


def test_karpathy_json(tmp_path):
    _images(tmp_path, "imgs/val2014/a.jpg", "imgs/train2014/b.jpg", "imgs/val2014/c.jpg")
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "A."}, {"raw": "B."}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "C."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "restval", "sentences": [{"raw": "D."}]},
    ]
    f = tmp_path / "dataset_coco.json"
    f.write_text(json.dumps({"images": images, "dataset": "coco"}))
    test = create_dataset("captions", str(f), split="test", images_dir=str(tmp_path / "imgs"))
    assert [test.text(i) for i in range(2)] == ["A.", "B."] and test.num_images == 1
    train = create_dataset("captions", str(tmp_path), split="train", images_dir=str(tmp_path / "imgs"))
    assert [train.text(i) for i in range(2)] == ["C.", "D."]
    assert train.fingerprint() != test.fingerprint()
    with pytest.raises(MmkdError, match="dataset_coco.json.*a.jpg"):
        create_dataset("captions", str(f), split="test")  # images not next to the json
