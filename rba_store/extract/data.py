"""Data sources: scikit-learn's bundled digits, image folders and ``.npz`` arrays.

A source knows its samples' labels and stable ids up front (so the store can be preallocated)
and loads any range of samples as a batch of model inputs, preprocessed with the model's timm
data config (``timm.data.create_transform(..., is_training=False)``).
"""

from __future__ import annotations

import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rba_store.errors import DataSourceError, NotFoundError, UnknownSplitError, UsageError
from rba_store.extract.npz import npz_arrays

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DIGITS_SEED = 0
# train / val / test = 60 / 20 / 20 %: test first, then val from the rest (both stratified)
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION_OF_REST = 0.25

Preprocess = Callable[[Image.Image], torch.Tensor]


def make_preprocess(data_config: dict[str, Any]) -> Preprocess:
    """timm's evaluation transform for a model's data config, with the channel count it expects."""
    from rba_store.extract.torchvision_compat import import_timm

    timm = import_timm()
    transform = timm.data.create_transform(**data_config, is_training=False)
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"

    def preprocess(image: Image.Image) -> torch.Tensor:
        return transform(image.convert(mode))

    return preprocess


class DataSource(ABC):
    """A finite, indexable set of samples with labels (-1 where unknown) and stable ids."""

    kind: str
    labels: np.ndarray  # int64, one per sample
    sample_ids: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def load(self, start: int, stop: int, preprocess: Preprocess) -> torch.Tensor:
        """Samples ``[start, stop)`` as one batch of model inputs."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Provenance for the store's attributes."""

    def limited(self, limit: int | None) -> DataSource:
        """The first ``limit`` samples (all when None)."""
        if limit is None:
            return self
        if limit < 1:
            raise UsageError(f"--limit {limit} is invalid; pass a positive number of samples")
        return _Limited(self, limit)

    @property
    def preprocessed(self) -> bool:
        """True when samples are already model inputs (no image preprocessing applies)."""
        return False


class _Limited(DataSource):
    def __init__(self, inner: DataSource, limit: int) -> None:
        self.inner = inner
        self.kind = inner.kind
        n = min(limit, len(inner))
        self.labels = inner.labels[:n]
        self.sample_ids = inner.sample_ids[:n]
        self.classes = inner.classes
        self.limit = limit

    def load(self, start: int, stop: int, preprocess: Preprocess) -> torch.Tensor:
        return self.inner.load(start, stop, preprocess)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() | {"limit": self.limit, "n_samples": len(self)}

    @property
    def preprocessed(self) -> bool:
        return self.inner.preprocessed


class DigitsSource(DataSource):
    """scikit-learn's 1,797 handwritten digits (8x8), split train/val/test 60/20/20 %
    (1,077 / 360 / 360), stratified, with a fixed seed."""

    kind = "digits"
    SPLITS = ("train", "val", "test")

    def __init__(self, split: str = "train") -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in self.SPLITS:
            raise UnknownSplitError(
                f"split {split!r} does not exist for digits; use one of {', '.join(self.SPLITS)}"
            )
        digits = load_digits()
        order = np.arange(len(digits.target))
        train, test = train_test_split(
            order,
            test_size=DIGITS_TEST_FRACTION,
            random_state=DIGITS_SEED,
            stratify=digits.target,
        )
        self.split = split
        train, val = train_test_split(
            train,
            test_size=DIGITS_VAL_FRACTION_OF_REST,
            random_state=DIGITS_SEED,
            stratify=digits.target[train],
        )
        self.indices = {"train": train, "val": val, "test": test}[split]
        # 0..16 intensities as 8-bit grayscale images, the form every image source has
        self.images = np.rint(digits.images[self.indices] * (255 / 16)).astype(np.uint8)
        self.labels = digits.target[self.indices].astype(np.int64)
        self.sample_ids = [f"digits/{i}" for i in self.indices]
        self.classes = [str(c) for c in range(10)]

    def load(self, start: int, stop: int, preprocess: Preprocess) -> torch.Tensor:
        return torch.stack(
            [preprocess(Image.fromarray(img, "L")) for img in self.images[start:stop]]
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": "digits",
            "path": "sklearn.datasets.load_digits",
            "split": self.split,
            "split_rule": f"test: train_test_split(test_size={DIGITS_TEST_FRACTION}, "
            f"random_state={DIGITS_SEED}, stratify=target); val: the same on the rest with "
            f"test_size={DIGITS_VAL_FRACTION_OF_REST}",
            "n_samples": len(self),
            "classes": self.classes,
        }


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


class FolderSource(DataSource):
    """Images in one sub-folder per class (or directly in the folder: unlabelled).

    With ``train/`` and ``val/`` (or ``test/``) sub-folders, ``split`` picks one of them.
    """

    kind = "folder"

    def __init__(self, root: Path, split: str | None = None) -> None:
        if not root.is_dir():
            raise NotFoundError(f"data folder {str(root)!r} does not exist; pass an image folder")
        base = root
        if split is not None:
            base = root / split
            if not base.is_dir():
                present = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise UnknownSplitError(
                    f"split {split!r} does not exist in {str(root)!r} (no {split}/ sub-folder; "
                    f"sub-folders: {', '.join(present) or 'none'}); pass one of them or no --split"
                )
        elif (root / "train").is_dir():
            split, base = "train", root / "train"
        self.root, self.base, self.split = root, base, split
        class_dirs = sorted(p for p in base.iterdir() if p.is_dir())
        files: list[Path] = []
        labels: list[int] = []
        if class_dirs:
            self.classes = [p.name for p in class_dirs]
            for label, class_dir in enumerate(class_dirs):
                found = sorted(p for p in class_dir.rglob("*") if _is_image(p))
                files += found
                labels += [label] * len(found)
        else:
            self.classes = []
            files = sorted(p for p in base.iterdir() if _is_image(p))
            labels = [-1] * len(files)
        if not files:
            raise DataSourceError(
                f"no images found in {str(base)!r}; expected one sub-folder per class holding "
                f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS[:4])} files"
            )
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sample_ids = [p.relative_to(base).as_posix() for p in files]

    def load(self, start: int, stop: int, preprocess: Preprocess) -> torch.Tensor:
        return torch.stack([preprocess(self._open(p)) for p in self.files[start:stop]])

    def unreadable(self, limit: int | None = None) -> list[str]:
        """Sample ids of the images (of the first ``limit``) that do not decode."""
        bad = []
        pairs = list(zip(self.files, self.sample_ids, strict=True))[:limit]
        for path, sample_id in pairs:
            try:
                self._open(path)
            except DataSourceError:
                bad.append(sample_id)
        return bad

    def skip(self, sample_ids: list[str]) -> None:
        """Leave these samples out (recorded in :meth:`describe`)."""
        keep = [i for i, s in enumerate(self.sample_ids) if s not in set(sample_ids)]
        self.files = [self.files[i] for i in keep]
        self.labels = self.labels[keep]
        self.sample_ids = [self.sample_ids[i] for i in keep]
        self.skipped = sorted(sample_ids)

    @staticmethod
    def _open(path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                image.load()
                return image.copy()
        except (OSError, SyntaxError, ValueError) as e:
            raise DataSourceError(
                f"cannot read image {str(path)!r} ({e}); remove or replace the file"
            ) from e

    def describe(self) -> dict[str, Any]:
        return {
            "source": "folder",
            "path": str(self.root.resolve()),
            "split": self.split,
            "n_samples": len(self),
            "classes": self.classes,
        } | ({"skipped_unreadable": self.skipped} if getattr(self, "skipped", None) else {})


class NpzSource(DataSource):
    """Arrays ``x`` (and optional ``y``) in a ``.npz`` file; ``x_<split>``/``y_<split>`` for splits.

    ``x`` as uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` is preprocessed like any image; as
    floating point ``(N, C, H, W)`` it is taken as model inputs, already preprocessed.
    """

    kind = "npz"

    def __init__(self, path: Path, split: str | None = None) -> None:
        if not path.is_file():
            raise NotFoundError(f"data file {str(path)!r} does not exist; pass a .npz file")
        if not zipfile.is_zipfile(path):  # numpy would suggest unpickling it: never do that
            raise DataSourceError(
                f"{str(path)!r} is not a .npz file (not a zip archive of .npy arrays); save the "
                "inputs with numpy.savez(PATH, x=..., y=...)"
            )
        x_key, y_key = ("x", "y") if split is None else (f"x_{split}", f"y_{split}")
        try:  # only x and y, and memory-mapped where stored uncompressed (extract/npz.py)
            names, arrays = npz_arrays(path, (x_key, y_key))
        except ValueError as e:
            if "pickle" in str(e):  # numpy's advice is to unpickle, which is unsafe: never
                raise DataSourceError(
                    f"{str(path)!r} holds an array of Python objects, which rba-store does not "
                    "load (it would mean unpickling); save numeric arrays x (and y) with "
                    "numpy.savez"
                ) from e
            raise DataSourceError(
                f"cannot read {str(path)!r} as .npz ({e}); write it again with numpy.savez"
            ) from e
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataSourceError(
                f"cannot read {str(path)!r} as .npz ({type(e).__name__}: {e}); write it again "
                "with numpy.savez"
            ) from e
        if x_key not in arrays:
            raise DataSourceError(
                f"{str(path)!r} has no array {x_key!r} (arrays: {', '.join(sorted(names))}); "
                "save the inputs as 'x' (and labels as 'y')"
            )
        x = arrays[x_key]
        if x.dtype == np.uint8 and x.ndim in (3, 4):
            self._preprocessed = False
        elif np.issubdtype(x.dtype, np.floating) and x.ndim == 4:
            self._preprocessed = True
        else:
            raise DataSourceError(
                f"{x_key!r} in {str(path)!r} has dtype {x.dtype} and shape {x.shape}; expected "
                "uint8 images (N, H, W[, C]) or float model inputs (N, C, H, W)"
            )
        if len(x) == 0:
            raise DataSourceError(f"{x_key!r} in {str(path)!r} is empty; it needs samples")
        y = arrays.get(y_key)
        if y is not None and y.shape != (len(x),):
            raise DataSourceError(
                f"{y_key!r} in {str(path)!r} has shape {y.shape}; expected ({len(x)},), one label "
                f"per sample of {x_key!r}"
            )
        self.path, self.split, self.x = path, split, x
        self.labels = np.full(len(x), -1, np.int64) if y is None else y.astype(np.int64)
        self.sample_ids = [f"{x_key}/{i}" for i in range(len(x))]
        self.classes = []

    @property
    def preprocessed(self) -> bool:
        return self._preprocessed

    def load(self, start: int, stop: int, preprocess: Preprocess) -> torch.Tensor:
        chunk = self.x[start:stop]
        if self._preprocessed:
            return torch.from_numpy(np.array(chunk, dtype=np.float32))  # a copy: writable
        return torch.stack([preprocess(Image.fromarray(img)) for img in chunk])

    def describe(self) -> dict[str, Any]:
        return {
            "source": "npz",
            "path": str(self.path.resolve()),
            "split": self.split,
            "n_samples": len(self),
            "classes": self.classes,
            "preprocessed": self._preprocessed,
        }


def open_source(
    spec: str,
    split: str | None = None,
    limit: int | None = None,
    *,
    skip_unreadable: bool | None = None,
) -> DataSource:
    """Open ``digits``, an image folder, or a ``.npz`` file.

    With ``skip_unreadable`` not None (extraction), every image of a folder that will be used is
    decoded first: unreadable ones are refused, all named, or left out (and recorded) with
    ``skip_unreadable=True``, before anything is written.
    """
    if spec == "digits":
        source: DataSource = DigitsSource(split or "train")
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            source = FolderSource(path, split)
        elif path.suffix == ".npz":
            source = NpzSource(path, split)
        elif not path.exists():
            raise NotFoundError(
                f"data source {spec!r} does not exist; "
                "pass 'digits', an image folder or a .npz file"
            )
        else:
            raise NotFoundError(
                f"data source {spec!r} is neither a folder nor a .npz file; pass 'digits', "
                "an image folder (one sub-folder per class) or a .npz file with an array 'x'"
            )
    if isinstance(source, FolderSource) and skip_unreadable is not None:
        bad = source.unreadable(limit)
        if bad and not skip_unreadable:
            raise DataSourceError(
                f"{len(bad)} image{'s' if len(bad) > 1 else ''} in {str(source.base)!r} cannot "
                f"be read: {', '.join(bad)}; remove or replace them, or pass --skip-unreadable "
                "to leave them out (recorded in the store)"
            )
        if bad:
            source.skip(bad)
    return source.limited(limit)
