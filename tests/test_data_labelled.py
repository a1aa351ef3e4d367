"""`labelled-captions`: labelled image datasets as image-caption pairs."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_data_images import _idx, _mnist

from mmkd.data import create_dataset
from mmkd.data.idx import FASHION_DEBIAN_DIR
from mmkd.data.labelled import class_text
from mmkd_core.errors import MmkdError


@pytest.fixture
def root(tmp_path):
    return str(_mnist(tmp_path / "m", gz=False))  # train: 5 samples labelled 0..4; test: 2


def test_captions(root):
    ds = create_dataset("labelled-captions", root, base="fashion-mnist")
    base = create_dataset("fashion-mnist", root)
    assert ds.modality == "image_text" and ds.split == "train" and len(ds) == 5
    assert ds.classes == base.classes and ds.label(3) == 3
    assert ds.text(0) == "a photo of a t-shirt/top." and ds.text(4) == "a photo of a coat."
    assert ds.prompts[9] == "a photo of a ankle boot."
    assert ds.image(2).tobytes() == base.image(2).tobytes()
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.text(1) == ds.text(1) and clone.image(1).tobytes() == ds.image(1).tobytes()
    test = create_dataset("label-captions", root, split="test", base="mnist", template="a digit {}")
    assert len(test) == 2 and test.text(1) == "a digit 1"


def test_class_text():
    assert class_text("T-shirt/top") == "t-shirt/top"
    assert class_text("aquarium_fish") == "aquarium fish"
    assert class_text(" Ankle  boot") == "ankle boot"


def test_fingerprint_and_rebuild(root):
    ds = create_dataset("labelled-captions", root, base="fashion_mnist")
    fp = ds.fingerprint()
    assert fp != ds.base.fingerprint()
    assert create_dataset("labelled-captions", root, base="fashion-mnist", template="a {}").fingerprint() != fp
    assert create_dataset("labelled-captions", root, base="mnist").fingerprint() != fp
    d = ds.describe()
    assert d["name"] == "labelled-captions" and d["num_samples"] == 5 and d["split"] == "train"
    assert d["options"] == {"base": "fashion-mnist", "template": "a photo of a {}."}
    json.dumps(d)
    rebuilt = create_dataset(d["name"], root, d["split"], **d["options"])
    assert rebuilt.fingerprint() == fp and rebuilt.text(0) == ds.text(0)
    # the base's content is part of it: moved, the same; one label of one base sample changed, another
    moved = Path(root).rename(Path(root).with_name("moved"))
    assert create_dataset("labelled-captions", str(moved), base="fashion-mnist").fingerprint() == fp
    _idx(moved / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 5]))
    assert create_dataset("labelled-captions", str(moved), base="fashion-mnist").fingerprint() != fp


def test_passthrough_options(tmp_path):
    ds = create_dataset("labelled-captions", base="shapes", count=3, seed=1, template="{}")
    assert len(ds) == 3 and ds.text(0) == ds.classes[ds.label(0)]
    options = ds.describe()["options"]
    assert options == {"base": "shapes", "template": "{}", "count": 3, "seed": 1}
    assert create_dataset("labelled-captions", **options).fingerprint() == ds.fingerprint()
    with pytest.raises(MmkdError, match="unknown option.*colour"):
        create_dataset("labelled-captions", base="shapes", colour=1)


def test_errors(root, tmp_path):
    with pytest.raises(MmkdError, match="--dataset-option base=NAME"):
        create_dataset("labelled-captions", root)
    with pytest.raises(MmkdError, match="unknown dataset 'nope'"):
        create_dataset("labelled-captions", root, base="nope")
    lines = tmp_path / "s.txt"
    lines.write_text("one\ntwo\n")
    with pytest.raises(MmkdError, match="base dataset 'text'") as e:
        create_dataset("labelled-captions", str(lines), base="text")
    assert "\n" not in str(e.value)
    for bad in ("no field", "{} and {}", "{0}", "{name}", "{:>4}", "a {"):
        with pytest.raises(MmkdError, match="template"):
            create_dataset("labelled-captions", root, base="mnist", template=bad)
    with pytest.raises(MmkdError, match="dataset 'mnist'.*split"):
        create_dataset("labelled-captions", root, split="val", base="mnist")


@pytest.mark.skipif(not FASHION_DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = create_dataset("labelled-captions", split="test", base="fashion-mnist")
    assert len(ds) == 10000
    assert ds.text(0) == f"a photo of a {ds.classes[ds.label(0)].lower()}."
