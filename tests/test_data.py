"""casify.data: offline datasets, splits and transforms (no network, no files outside tmp_path)."""
import numpy as np
import pytest
import torch

from casify.data import (NpzDataset, build_dataset, cifar_train_transform, digits_dataset, imagefolder_dataset,
                         imagenet_eval_transform, imagenet_train_transform, to_image_tensor, torchvision_dataset,
                         train_val_split)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def rgb_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    y = np.arange(20) % 10
    return _write_npz(tmp_path / "rgb.npz", x=x, y=y), x, y


def test_npz_nhwc_round_trip(rgb_npz):
    path, x, y = rgb_npz
    ds = NpzDataset(path)
    assert len(ds) == 20 and ds.num_classes == 10
    img, label = ds[3]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
    assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(x[3]).permute(2, 0, 1))
    assert label == int(y[3]) and isinstance(label, int)


def test_npz_grayscale_and_named_splits(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = _write_npz(tmp_path / "mnist.npz", x_train=x_train, y_train=np.arange(12) % 10, x_test=x_test,
                      y_test=np.arange(5))
    train, test = NpzDataset(path, split="train"), NpzDataset(path, split="test")
    assert (len(train), len(test)) == (12, 5)
    img, label = test[4]
    assert img.shape == (1, 28, 28) and label == 4
    assert torch.allclose(img[0], torch.from_numpy(x_test[4]).float() / 255)
    assert len(NpzDataset(path, split="train", indices=[0, 2, 4])) == 3


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .npz file"):
        NpzDataset(tmp_path / "missing.npz")
    path = _write_npz(tmp_path / "bad.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match=r"has keys \['images', 'labels'\]; expected 'x' and 'y'"):
        NpzDataset(path)
    multi = _write_npz(tmp_path / "multi.npz", x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.zeros(2))
    with pytest.raises(ValueError, match="pass split='train'"):
        NpzDataset(multi)
    floats = _write_npz(tmp_path / "float.npz", x=np.zeros((2, 8, 8, 3), np.float32), y=np.zeros(2))
    with pytest.raises(ValueError, match="uint8"):
        NpzDataset(floats)


def test_digits_splits_are_fixed_disjoint_and_in_range():
    sizes = {s: len(digits_dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1259, "val": 179, "test": 359}
    assert sum(sizes.values()) == 1797
    a, b = digits_dataset("test"), digits_dataset("test")
    assert torch.equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert set(np.bincount(a.labels)) <= {35, 36, 37}  # stratified: about 20 % of each class of ~180
    train, test = digits_dataset("train"), digits_dataset("test")
    flat = {tuple(img.flatten().tolist()) for img in train.images}
    assert sum(tuple(img.flatten().tolist()) in flat for img in test.images) < 5  # (a few digits are exact duplicates)
    assert train.images.min() >= 0 and train.images.max() <= 1 and train.images.max() > 0.99
    img, label = train[0]
    assert img.shape == (3, 16, 16) and 0 <= label < 10
    assert torch.equal(img[0], img[1])
    assert digits_dataset("val", size=8, channels=1)[0][0].shape == (1, 8, 8)
    assert digits_dataset("val", size=32)[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="split must be one of"):
        digits_dataset("validation")


def test_cifar_augmentation_shape_range_and_randomness():
    torch.manual_seed(0)
    tf = cifar_train_transform()
    img = torch.rand(3, 32, 32) * 0.5 + 0.5  # strictly positive, so zero padding is visible after a shifted crop
    outs = [tf(img) for _ in range(20)]
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert any((o == 0).all(dim=0).any() for o in outs)  # some crops reach into the zero padding
    assert any(not torch.equal(o, outs[0]) for o in outs[1:])
    uint8 = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert tf(uint8).shape == (3, 32, 32)


def test_imagenet_transforms_on_pil():
    from PIL import Image
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    for tf in (imagenet_train_transform(48), imagenet_eval_transform(48)):
        out = tf(pil)
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert to_image_tensor(pil.convert("L")).shape == (1, 60, 80)


def test_train_val_split_is_disjoint_and_deterministic():
    ds = torch.utils.data.TensorDataset(torch.arange(100))
    train, val = train_val_split(ds, 10, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(100))
    assert train_val_split(ds, 10, seed=3)[1].indices == val.indices
    assert train_val_split(ds, 10, seed=4)[1].indices != val.indices
    last = train_val_split(ds, 0.05, seed=None)[1]
    assert last.indices == list(range(95, 100))  # the CIFAR-10 convention: the last items
    with pytest.raises(ValueError, match="non-empty"):
        train_val_split(ds, 100)


def _image_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_dataset(tmp_path):
    _image_folder(tmp_path / "train", per_class=5)
    _image_folder(tmp_path / "val")
    ds = imagefolder_dataset(tmp_path / "val", imagenet_eval_transform(24))
    assert len(ds) == 6 and ds.num_classes == 2
    img, label = ds[5]
    assert img.shape == (3, 24, 24) and label == 1 and 0 <= img.min() and img.max() <= 1
    # ImageNet layout: val/ is the test set; validation is held out of train/ by a seeded random choice.
    name = f"imagefolder:{tmp_path}"
    test = build_dataset(name, "test", image_size=24)
    train, val = build_dataset(name, "train", image_size=24), build_dataset(name, "val", image_size=24)
    assert len(test) == 6 and (len(train), len(val)) == (9, 1)
    assert set(train.indices).isdisjoint(val.indices)
    assert build_dataset(name, "train", image_size=24, augment=True)[0][0].shape == (3, 24, 24)
    with pytest.raises(FileNotFoundError, match="no folder"):
        build_dataset(f"imagefolder:{tmp_path / 'train'}", "test")


def test_build_dataset_npz_holds_out_the_last_items(rgb_npz):
    path, x, _ = rgb_npz
    train = build_dataset(str(path), "train", val_size=5)
    val = build_dataset(str(path), "val", val_size=5)
    assert val.indices == list(range(15, 20)) and train.indices == list(range(15))
    assert len(build_dataset(path, "test")) == 20  # a single-split file used as the test set is taken whole
    assert len(build_dataset(path, "train", val_size=0)) == 20
    img, _ = build_dataset(path, "train", augment=True)[0]
    assert img.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="no validation split"):
        build_dataset(path, "val", val_size=0)


def test_build_dataset_digits_and_errors(tmp_path):
    ds = build_dataset("digits", "val")
    assert len(ds) == 179 and ds.num_classes == 10
    assert build_dataset("digits", "train", augment=True, size=32)[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="valid choices: digits, cifar10"):
        build_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("digits", "training")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_torchvision_missing_files_do_not_download(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="download=True") as caught:  # offline-ok: asserts nothing downloads
        torchvision_dataset(name, "train", root=tmp_path)
    assert "--data-root" in str(caught.value)  # the CLI's words too: its users have no root= to pass
    assert not any(tmp_path.iterdir())  # nothing was created, let alone downloaded
