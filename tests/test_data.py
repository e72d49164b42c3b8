"""Data sources: digits split, image folders (classes, splits, unlabelled), .npz arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from rba_store.errors import DataSourceError
from rba_store.extract.data import DigitsSource, open_source


def identity(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))


def save_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    splits = {name: DigitsSource(name) for name in ("train", "val", "test")}
    assert tuple(len(s) for s in splits.values()) == (1077, 360, 360)
    ids = {name: set(s.sample_ids) for name, s in splits.items()}
    assert all(len(ids[name]) == len(splits[name]) for name in splits)  # no repeats in a split
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == {f"digits/{i}" for i in range(1797)}
    for name in ("val", "test"):  # stratified: every digit, in about its share (~36 each)
        counts = np.bincount(splits[name].labels, minlength=10)
        assert len(counts) == 10 and counts.min() >= 34, (name, counts)
    target = load_digits().target
    for name, source in splits.items():  # seeded: the same ids every time; labels follow the ids
        assert DigitsSource(name).sample_ids == source.sample_ids, name
        index = [int(i.removeprefix("digits/")) for i in source.sample_ids]
        np.testing.assert_array_equal(source.labels, target[index])
    first = splits["train"].load(0, 1, identity)[0]
    assert first.shape == (8, 8) and float(first.max()) <= 255.0


def test_folder_with_classes_and_splits(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for label in ("cat", "dog"):
            for i in range(n):
                save_png(tmp_path / split / label / f"{i}.png", 10 * i)
    (tmp_path / "train" / "cat" / "README.txt").write_text("not an image: ignored")
    train = open_source(str(tmp_path))
    assert train.describe()["split"] == "train" and len(train) == 6
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and train.classes == ["cat", "dog"]
    assert train.sample_ids[3] == "dog/0.png"
    val = open_source(str(tmp_path), split="val", limit=3)
    assert len(val) == 3 and val.load(0, 3, identity).shape == (3, 4, 4)
    with pytest.raises(DataSourceError, match=r"split 'test' does not exist .*train, val"):
        open_source(str(tmp_path), split="test")


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        save_png(tmp_path / f"img{i}.png", i)
    source = open_source(str(tmp_path))
    assert source.labels.tolist() == [-1, -1, -1]
    assert source.load(1, 2, identity)[0, 0, 0] == 1


def test_npz_images_and_preprocessed_inputs(tmp_path: Path) -> None:
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    np.savez(tmp_path / "images.npz", x=images, y=np.arange(5))
    source = open_source(str(tmp_path / "images.npz"))
    assert source.labels.tolist() == [0, 1, 2, 3, 4] and not source.preprocessed
    np.testing.assert_array_equal(source.load(2, 3, identity)[0].numpy(), images[2])
    inputs = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=inputs)
    raw = open_source(str(tmp_path / "inputs.npz"))
    assert raw.preprocessed and raw.labels.tolist() == [-1, -1, -1]
    np.testing.assert_array_equal(raw.load(0, 3, identity).numpy(), inputs)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_arrays_are_mapped_not_read_whole(tmp_path: Path, save: object) -> None:
    """Uncompressed members are memory-mapped where they lie in the archive (counting and
    extracting take a batch of memory); compressed ones are read; only x and y of the split."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 5, 6), dtype=np.uint8)
    fortran = np.asfortranarray(rng.normal(size=(4, 2, 3, 3)).astype(np.float64))
    other = np.array([{"a": 1}], dtype=object)  # another split's array: never read
    path = tmp_path / "data.npz"
    save(path, x_train=x, y_train=np.arange(7), x_val=other, inputs=fortran)  # type: ignore[operator]
    source = open_source(str(path), "train")
    assert isinstance(source.x, np.memmap) == (save is np.savez)
    np.testing.assert_array_equal(source.x, x)
    np.testing.assert_array_equal(source.load(3, 5, identity).numpy(), x[3:5])
    assert source.labels.tolist() == list(range(7))
    from rba_store.extract.npz import npz_arrays

    np.testing.assert_array_equal(npz_arrays(path, ["inputs"])[1]["inputs"], fortran)
    with pytest.raises(DataSourceError, match="array of Python objects"):
        open_source(str(path), "val")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "has no array 'x'"),
        ({"x": np.zeros((2, 4), np.float32)}, "expected uint8 images"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3)}, "one label per sample"),
    ],
)
def test_bad_npz_files(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataSourceError, match=message):
        open_source(str(tmp_path / "bad.npz"))


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    save_png(tmp_path / "a" / "good.png", 1)
    (tmp_path / "a" / "z_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    source = open_source(str(tmp_path))
    with pytest.raises(
        DataSourceError, match=r"cannot read image '.*z_bad\.jpg'.*remove or replace"
    ):
        source.load(0, 2, identity)
