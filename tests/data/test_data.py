import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pdq.data import FashionMNISTDataModule, ImageNetDataModule, read_idx
from pdq.data import fashion_mnist as fm
from pdq.data.calib import draw_indices
from pdq.errors import PdqError


def write_idx(path, array: np.ndarray, gz: bool = False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_roundtrip_and_corruption(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    write_idx(tmp_path / "a.gz", a, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(PdqError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    raw = (tmp_path / "a").open("wb")
    raw.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    raw.close()
    with pytest.raises(PdqError, match="truncated or corrupt"):
        read_idx(tmp_path / "a")


def test_real_fashion_mnist_splits():
    dm = FashionMNISTDataModule()
    x, y = dm.split("train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = dm.split("test")
    assert xt.shape == (10000, 28, 28) and torch.bincount(yt).tolist() == [1000] * 10
    batch, labels = next(iter(dm.test_dataloader()))
    assert batch.shape == (1000, 1, 28, 28) and abs(batch.mean().item()) < 0.1


def test_data_root_takes_precedence(tmp_path):
    imgs = np.full((5, 28, 28), 7, np.uint8)
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", imgs[:n])
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n))
    dm = FashionMNISTDataModule(root=str(tmp_path), download=False)
    assert dm.train_size == 5 and len(dm.split("test")[1]) == 3


def test_missing_data_lists_places_and_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "nothing-here")
    dm = FashionMNISTDataModule(root=str(tmp_path / "empty"), download=False)
    with pytest.raises(PdqError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "empty" in msg and "nothing-here" in msg and "apt-get install -y dataset-fashion-mnist" in msg
    assert "torchvision download" in msg


def test_calibration_draw_is_seeded():
    a, b, c = draw_indices(60000, 1024, 1), draw_indices(60000, 1024, 1), draw_indices(60000, 1024, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a.unique()) == 1024
    with pytest.raises(PdqError, match="calib.size=70000 .*accepted: 1..60000"):
        draw_indices(60000, 70000, 0)
    dm = FashionMNISTDataModule()
    x = dm.calibration_set(64, seed=3)
    assert x.shape == (64, 1, 28, 28) and torch.equal(x, dm.calibration_set(64, seed=3))


@pytest.fixture
def tiny_imagenet(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (300, 280, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    return tmp_path


def test_imagenet_folder(tiny_imagenet):
    dm = ImageNetDataModule(root=str(tiny_imagenet), num_workers=0, eval_batch_size=3)
    dm.prepare_data()
    assert dm.num_classes == 2 and dm.train_size == 8
    x = dm.calibration_set(5, seed=0)
    assert x.shape == (5, 3, 224, 224)
    assert torch.equal(x, dm.calibration_set(5, seed=0))  # augmentation is seeded too
    assert not torch.equal(x, dm.calibration_set(5, seed=1))
    batch, labels = next(iter(dm.test_dataloader()))
    assert batch.shape == (3, 3, 224, 224) and labels.tolist() == [0, 0, 1]


def test_imagenet_missing_split(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(PdqError, match="has no 'val/' folder"):
        ImageNetDataModule(root=str(tmp_path)).prepare_data()
    with pytest.raises(PdqError, match="needs data.root"):
        ImageNetDataModule(root=None).prepare_data()


def test_synthetic_images_are_seeded_and_checked():
    from pdq.errors import PdqError, instantiate
    from tests.conftest import compose_config

    data = instantiate(compose_config("data=synthetic", "data.size=12", "data.image_size=8").data)
    data.setup()
    a, b, c = data.calibration_set(5, 1), data.calibration_set(5, 1), data.calibration_set(5, 2)
    assert a.shape == (5, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert data.train_size == 12 and data.test_dataloader() is None
    with pytest.raises(PdqError, match="data.image_size=0"):
        instantiate(compose_config("data=synthetic", "data.image_size=0").data)
