"""Image adapters: `imagefolder`/`imagenet`, `cifar10`/`cifar100`, `mnist`/`fashion-mnist`, `stl10`."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.data import create_dataset
from mmkd.data.idx import FASHION_DEBIAN_DIR
from mmkd_core.errors import MmkdError

# --- imagefolder -----------------------------------------------------------------------------------------


def _folder(root: Path) -> Path:
    colours = {"n01": (255, 0, 0), "n02": (0, 255, 0)}
    for k, (cls, rgb) in enumerate(colours.items()):
        d = root / "train" / cls
        d.mkdir(parents=True)
        Image.new("RGB", (8, 6), rgb).save(d / "a.png")
        Image.new("L", (5, 5), 128).save(d / f"b{k}.JPEG")
    (root / "train" / "n02" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder(tmp_path):
    root = _folder(tmp_path)
    ds = create_dataset("imagenet", str(root))
    assert ds.name == "imagefolder" and ds.classes == ["n01", "n02"] and len(ds) == 4
    assert [ds.label(i) for i in range(4)] == [0, 0, 1, 1]
    assert ds.image(0).getpixel((0, 0)) == (255, 0, 0)
    grey = ds.image(1)
    assert grey.mode == "RGB" and grey.size == (5, 5)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.image(2).getpixel((1, 1)) == (0, 255, 0)
    # root holding the class directories directly
    assert len(create_dataset("imagefolder", str(root / "train"), split="val")) == 4


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_imagefolder_fingerprint(tmp_path):
    root = _folder(tmp_path / "here")
    fp = create_dataset("imagefolder", str(root)).fingerprint()
    # unrelated to the content: where the folder lives, a file that is not an image
    root = root.rename(tmp_path / "moved")
    assert create_dataset("imagefolder", str(root)).fingerprint() == fp
    (root / "train" / "n02" / "notes.txt").write_text("edited notes")
    assert create_dataset("imagefolder", str(root)).fingerprint() == fp
    # the content: one byte of one image, then one image fewer
    image = root / "train" / "n01" / "a.png"
    original = image.read_bytes()
    _flip_last_byte(image)
    assert create_dataset("imagefolder", str(root)).fingerprint() != fp
    image.write_bytes(original)
    assert create_dataset("imagefolder", str(root)).fingerprint() == fp
    (root / "train" / "n02" / "b1.JPEG").unlink()
    assert create_dataset("imagefolder", str(root)).fingerprint() != fp


def test_imagefolder_errors(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(MmkdError, match="val"):
        create_dataset("imagefolder", str(root), split="val")  # root has 'train' only: not class dirs
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(MmkdError, match="no images"):
        create_dataset("imagefolder", str(tmp_path / "empty"))
    (root / "train" / "n01" / "broken.png").write_bytes(b"not a png")
    ds = create_dataset("imagefolder", str(root))
    i = [str(ds.path(k)) for k in range(len(ds))].index(str(root / "train" / "n01" / "broken.png"))
    with pytest.raises(MmkdError, match="broken.png"):
        ds.image(i)


# --- cifar -----------------------------------------------------------------------------------------------


def _cifar_batch(path: Path, n: int, labels_key: bytes, num_classes: int, seed: int, extra=None) -> None:
    rng = np.random.default_rng(seed)
    d = {
        b"batch_label": b"batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        labels_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"filenames": [b"x.png"] * n,
        **(extra or {}),
    }
    path.write_bytes(pickle.dumps(d, protocol=2))


def _cifar10(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"c{k}".encode() for k in range(10)]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    for k in range(1, 6):
        _cifar_batch(d / f"data_batch_{k}", 3, b"labels", 10, k)
    _cifar_batch(d / "test_batch", 2, b"labels", 10, 0)
    return d


def test_cifar10(tmp_path):
    d = _cifar10(tmp_path)
    train = create_dataset("cifar10", str(tmp_path))
    assert len(train) == 15 and train.classes[3] == "c3"
    batch = pickle.loads((d / "data_batch_2").read_bytes(), encoding="bytes")
    img = train.image(4)  # second image of data_batch_2
    assert img.size == (32, 32) and img.mode == "RGB"
    assert img.getpixel((5, 1)) == tuple(int(batch[b"data"][1][c * 1024 + 1 * 32 + 5]) for c in range(3))
    assert train.label(4) == batch[b"labels"][1]
    test = create_dataset("cifar10", str(d), split="test")
    assert len(test) == 2 and test.fingerprint() != train.fingerprint()
    clone = pickle.loads(pickle.dumps(train))
    assert clone._images is None and clone.image(4).tobytes() == img.tobytes()
    fp = train.fingerprint()
    moved = d.rename(tmp_path / "elsewhere")
    assert create_dataset("cifar10", str(moved)).fingerprint() == fp  # where it lives is not content
    (moved / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))  # the same content rewritten
    assert create_dataset("cifar10", str(moved)).fingerprint() == fp
    batch[b"data"][1, 0] ^= 1  # one byte of one image
    (moved / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    assert create_dataset("cifar10", str(moved)).fingerprint() != fp


def test_cifar100(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    meta = {b"fine_label_names": [f"f{k}".encode() for k in range(100)], b"coarse_label_names": [b"c"] * 20}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    _cifar_batch(d / "train", 4, b"fine_labels", 100, 1, {b"coarse_labels": [0, 1, 2, 19]})
    _cifar_batch(d / "test", 2, b"fine_labels", 100, 2, {b"coarse_labels": [5, 6]})
    ds = create_dataset("cifar100", str(d))
    assert len(ds) == 4 and len(ds.classes) == 100 and ds.classes[7] == "f7"
    coarse = create_dataset("cifar100", str(tmp_path), split="test", labels="coarse")
    assert len(coarse.classes) == 20 and coarse.label(1) == 6


def test_cifar_errors(tmp_path):
    d = _cifar10(tmp_path)
    (d / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(MmkdError, match="data_batch_3"):
        create_dataset("cifar10", str(d))
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2))
    with pytest.raises(MmkdError, match="data_batch_3.*labels"):
        create_dataset("cifar10", str(d))
    (d / "data_batch_3").write_bytes(pickle.dumps(os.system, protocol=2))  # code, not data
    with pytest.raises(MmkdError, match="data_batch_3"):
        create_dataset("cifar10", str(d))
    (d / "data_batch_3").unlink()
    with pytest.raises(MmkdError, match="data_batch_3"):
        create_dataset("cifar10", str(d))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmkdError, match="batches.meta"):
        create_dataset("cifar10", str(tmp_path / "empty"))


# --- mnist / fashion-mnist -------------------------------------------------------------------------------


def _idx(path: Path, arr: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else 0x0800 | arr.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def _mnist(root: Path, gz: bool, n: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n), ("t10k", 2)):
        _idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (count, 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(count) % 10)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_mnist(tmp_path, gz):
    root = _mnist(tmp_path / "m", gz)
    ds = create_dataset("mnist", str(root))
    assert len(ds) == 5 and ds.classes == [str(k) for k in range(10)] and ds.label(3) == 3
    img = ds.image(2)
    assert img.mode == "RGB" and img.size == (28, 28)
    g = img.getpixel((4, 7))
    assert g[0] == g[1] == g[2]
    assert len(create_dataset("mnist", str(root), split="test")) == 2
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._images is None and clone.image(2).tobytes() == img.tobytes()
    fp = ds.fingerprint()
    ext = ".gz" if gz else ""
    root = root.rename(tmp_path / "moved")
    assert create_dataset("mnist", str(root)).fingerprint() == fp  # where it lives is not content
    _idx(root / f"train-labels-idx1-ubyte{ext}", np.array([0, 1, 2, 3, 5]))  # one label of one sample
    assert create_dataset("mnist", str(root)).fingerprint() != fp


def test_fashion_mnist_classes(tmp_path):
    _mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds = create_dataset("fashion-mnist", str(tmp_path))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_idx_errors(tmp_path):
    root = _mnist(tmp_path, gz=False)
    images = root / "train-images-idx3-ubyte"
    _idx(images, np.zeros((5, 28, 28)), magic=0x0801)
    with pytest.raises(MmkdError, match="train-images-idx3-ubyte.*magic"):
        create_dataset("mnist", str(root))
    _idx(images, np.zeros((5, 28, 28)))
    images.write_bytes(images.read_bytes()[:-1])  # truncated
    with pytest.raises(MmkdError, match="train-images-idx3-ubyte.*bytes"):
        create_dataset("mnist", str(root))
    _idx(images, np.zeros((4, 28, 28)))
    with pytest.raises(MmkdError, match="4 images.*5 labels"):
        create_dataset("mnist", str(root))
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MmkdError, match="t10k-labels-idx1-ubyte"):
        create_dataset("mnist", str(root), split="test")
    (root / "bad.gz").write_bytes(b"not gzip")
    (root / "train-labels-idx1-ubyte").unlink()
    (root / "bad.gz").rename(root / "train-labels-idx1-ubyte.gz")
    with pytest.raises(MmkdError, match="train-labels-idx1-ubyte.gz"):
        create_dataset("mnist", str(root))
    with pytest.raises(MmkdError, match="root"):
        create_dataset("mnist")


@pytest.mark.skipif(not FASHION_DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_fashion_mnist_debian_default():
    ds = create_dataset("fashion-mnist", split="test")
    assert len(ds) == 10000 and ds.label(0) == 9 and ds.image(0).size == (28, 28)


# --- stl10 -----------------------------------------------------------------------------------------------


def test_stl10(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    (d / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    imgs = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    # the release stores each image as (channel, column, row)
    (d / "train_X.bin").write_bytes(imgs.transpose(0, 3, 2, 1).tobytes())
    (d / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    ds = create_dataset("stl10", str(tmp_path))
    assert len(ds) == 3 and [ds.label(i) for i in range(3)] == [0, 9, 3]
    assert np.array_equal(np.asarray(ds.image(1)), imgs[1])
    (d / "train_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(MmkdError, match="train_y.bin"):
        create_dataset("stl10", str(d))
