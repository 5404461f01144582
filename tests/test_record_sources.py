"""Hugging Face datasets (``hfds:``) and WebDataset shards (``wds:``) as data sources, offline: a few generated images
saved as a local HF dataset and as two tar shards, read through build_dataset; their items are the same images as the
npz they were made from, augmentation is seeded per item, and the bad inputs are one clear line each."""
import io
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from casify.data import EpochSeededDataset, ToImageTensor, build_dataset

N, SIZE, CLASSES = 12, 20, 3


def _images():
    rng = np.random.default_rng(0)
    labels = np.arange(N) % CLASSES
    pixels = (rng.random((N, SIZE, SIZE, 3)) * 80 + 60 * labels[:, None, None, None]).astype(np.uint8)
    return pixels, labels


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless: the items can be compared exactly
    return buf.getvalue()


def _write_shards(folder, pixels, labels, shards=2):
    """WebDataset's layout: members ``<key>.png`` and ``<key>.cls`` next to each other, records split over shards."""
    folder.mkdir(parents=True, exist_ok=True)
    per = int(np.ceil(len(labels) / shards))
    for s in range(shards):
        with tarfile.open(folder / f"digits-train-{s:04d}.tar", "w") as tar:
            for i in range(s * per, min(len(labels), (s + 1) * per)):
                for ext, data in (("png", _png(pixels[i])), ("cls", str(int(labels[i])).encode())):
                    info = tarfile.TarInfo(f"sample{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / ("digits-train-{0000..%04d}.tar" % (shards - 1)))


def _save_hf(folder, pixels, labels, splits=("train", "test")):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{c}" for c in range(CLASSES)])})
    make = lambda idx: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [Image.fromarray(pixels[i]) for i in idx], "label": [int(labels[i]) for i in idx]}, features=features)
    half = len(labels) * 3 // 4
    parts = {"train": range(half), "test": range(half, len(labels))}
    datasets.DatasetDict({k: make(parts[k]) for k in splits}).save_to_disk(str(folder))
    return str(folder)


def _as_uint8(t: torch.Tensor) -> np.ndarray:
    return (t * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_webdataset_shards_are_read_by_position_with_exact_images(tmp_path):
    pytest.importorskip("wids")
    pixels, labels = _images()
    pattern = _write_shards(tmp_path / "wds", pixels, labels)
    test = build_dataset(f"wds:{pattern}", "test", transform=ToImageTensor())  # one pattern as the test set: whole
    assert len(test) == N
    for i in (0, 5, 6, N - 1):  # both shards, across the boundary
        x, y = test[i]
        assert y == labels[i] and x.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(_as_uint8(x), pixels[i])
    # train / val: held out of the shards (seeded 10 %, at least one item), disjoint; a glob names the same shards
    train = build_dataset(f"wds:{tmp_path / 'wds' / '*.tar'}", "train", image_size=SIZE, val_size=3)
    val = build_dataset(f"wds/{pattern}", "val", image_size=SIZE, val_size=3)  # timm's spelling works too
    assert len(train) == N - 3 and len(val) == 3
    assert not set(train.indices) & set(val.indices)


def test_webdataset_augmentation_is_seeded_per_item_and_survives_pickling(tmp_path):
    """What exact resume rests on: item i of epoch e is the same augmented image in a fresh process (pickled, as a
    DataLoader worker receives it), whatever was read before."""
    pytest.importorskip("wids")
    import pickle
    pixels, labels = _images()
    train = build_dataset(f"wds:{_write_shards(tmp_path / 'wds', pixels, labels)}", "train", image_size=16,
                          augment=True, val_size=2)
    seeded = EpochSeededDataset(train, seed=3)
    seeded.set_epoch(1)
    first = seeded[4][0]
    seeded[7], seeded[1]
    again = pickle.loads(pickle.dumps(seeded))
    assert torch.equal(seeded[4][0], first) and torch.equal(again[4][0], first)
    seeded.set_epoch(2)
    assert not torch.equal(seeded[4][0], first)  # a new epoch draws a new crop


def test_hf_dataset_folder_splits_and_images(tmp_path):
    pixels, labels = _images()
    folder = _save_hf(tmp_path / "hf", pixels, labels)
    test = build_dataset(f"hfds:{folder}", "test", transform=ToImageTensor())
    assert len(test) == N - N * 3 // 4 and test.num_classes == CLASSES
    x, y = test[0]
    np.testing.assert_array_equal(_as_uint8(x), pixels[N * 3 // 4])
    assert y == labels[N * 3 // 4]
    train = build_dataset(f"hfds:{folder}", "train", image_size=SIZE, val_size=2)
    val = build_dataset(f"hfds:{folder}", "val", image_size=SIZE, val_size=2)
    assert len(train) + len(val) == N * 3 // 4 and len(val) == 2
    # ImageNet's layout: train + an unlabelled test + validation -> validation is the test set, val comes from train
    import datasets
    unlabelled = tmp_path / "in"
    d = datasets.load_from_disk(folder)
    datasets.DatasetDict({"train": d["train"], "validation": d["test"],
                          "test": d["test"].cast_column("label", datasets.Value("int64")).map(
                              lambda r: {"label": -1})}).save_to_disk(str(unlabelled))
    assert len(build_dataset(f"hfds:{unlabelled}", "test", image_size=SIZE)) == len(d["test"])
    x, y = build_dataset(f"hfds:{unlabelled}", "test", transform=ToImageTensor())[1]
    np.testing.assert_array_equal(_as_uint8(x), pixels[N * 3 // 4 + 1])
    assert y == labels[N * 3 // 4 + 1]


def test_a_recipe_trains_on_shards_and_tests_on_a_hf_dataset(tmp_path, one_thread):
    """The recipe path end to end (train, select, evaluate): training and held-out data from the shards, the test set
    from the HF folder."""
    pytest.importorskip("wids")
    from casify.recipe import CommandLine, load_recipe, run
    pixels, labels = _images()
    recipe = load_recipe(None, CommandLine(overrides=[
        "model.name=cifar_resnet18", "model.kwargs={num_classes: 3, width: 0.125}", "model.cas_layers=[layer4.1]",
        f"data.name=wds:{_write_shards(tmp_path / 'wds', pixels, labels)}",
        f"data.test=hfds:{_save_hf(tmp_path / 'hf', pixels, labels)}", "data.image_size=16", "data.val_size=2",
        "train.batch_size=4", "train.attack_steps=1", "train.val_max_examples=2", "train.val_attack_steps=1",
        "train.progress=false", "eval.max_examples=2", "eval.suite=quick"],
        output_dir=str(tmp_path / "run"), max_steps=1))
    summary = run(recipe)
    assert summary["steps"] == 1 and summary["test"]["n"] == 2 and summary["validation"][0]["val_count"] == 2


def test_bad_record_sources_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"matches no shard file"):
        build_dataset(f"wds:{tmp_path}/nothing-{{0000..0003}}.tar", "train")
    with pytest.raises(FileNotFoundError, match=r"data.download: true"):
        build_dataset("hfds:someone/some-dataset", "train")
    with pytest.raises(FileNotFoundError, match="no folder"):
        build_dataset(f"hfds:{tmp_path}/missing", "train")
    with pytest.raises(ValueError, match=r"data.kwargs \['size'\] are not settings"):
        build_dataset(f"wds:{tmp_path}/x.tar", "train", size=3)
    # a library that is not installed: one line naming the extra that installs it
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the 'datasets' library.*pip install 'casify-robust\[hf\]'") as e:
        build_dataset(f"hfds:{tmp_path}", "train")
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "braceexpand", None)
    with pytest.raises(ImportError, match=r"pip install 'casify-robust\[wds\]'"):
        build_dataset(f"wds:{tmp_path}/x.tar", "train")
