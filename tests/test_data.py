"""The dataset registry as a whole: names, aliases, option checks, descriptions."""

import json

import pytest

from mmkd.data import DATASETS, create_dataset, list_datasets
from mmkd_core.errors import MmkdError

NAMES = ["captions", "cifar10", "cifar100", "fashion-mnist", "imagefolder", "mnist", "mrpc", "qqp", "shapes"]
NAMES += ["stl10", "text"]
WRAPPERS = ["labelled-captions"]  # built over another dataset: tested in test_data_labelled.py


def test_all_registered():
    assert list_datasets() == sorted(NAMES + WRAPPERS)
    for alias, name in [("imagenet", "imagefolder"), ("coco", "captions"), ("cifar-10", "cifar10")]:
        assert DATASETS.canonical(alias) == name


def test_unknown_name():
    with pytest.raises(MmkdError, match="unknown dataset 'nope'.*shapes"):
        create_dataset("nope")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_mmkd_error(name):
    with pytest.raises(MmkdError, match="unknown option.*bogus"):
        create_dataset(name, None, bogus=1)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("shapes", "fashion-mnist")])
def test_missing_root(name, tmp_path):
    with pytest.raises(MmkdError, match="root"):
        create_dataset(name, None)
    with pytest.raises(MmkdError, match="does-not-exist"):
        create_dataset(name, str(tmp_path / "does-not-exist"))


def test_describe_is_json(tmp_path):
    (tmp_path / "s.txt").write_text("hello\n")
    for ds in (create_dataset("shapes", count=3), create_dataset("text", str(tmp_path / "s.txt"))):
        d = json.loads(json.dumps(ds.describe()))
        assert d["name"] == ds.name and d["num_samples"] == len(ds) and d["split"] == ds.split
        assert len(ds.fingerprint()) == 64
