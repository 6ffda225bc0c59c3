"""CIFAR-10 sources, decoding with an on-disk cache, and fingerprinted splits.

Everything downstream works on uint8 NCHW tensors held in memory: 60,000 images
of 3x32x32 are 184 MB, so there is no reason to stream from disk while training.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import paths

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TORCHVISION_DIRNAME = "cifar-10-batches-py"
SPLITS = ("seed", "canonical", "official")


class DataSourceError(RuntimeError):
    """The data could not be found or read; the message says what to do."""


def cache_dir() -> Path:
    """Where decoded arrays go. Never inside the (possibly read-only) data folder."""
    root = os.environ.get("CIFAR_CORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cifar_core")
    return Path(root)


@dataclass
class Cifar10:
    """All 60,000 images: the official train set first, then the official test set."""
    images: torch.Tensor        # uint8, N x 3 x 32 x 32
    labels: torch.Tensor        # int64, N
    is_official_test: torch.Tensor  # bool, N
    source: str                 # human-readable description, saved in checkpoints
    fingerprint: str            # hash of the source files; keys the cache
    classes: tuple = CLASSES

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------
# Finding the data
# ---------------------------------------------------------------------------------------------

def resolve_data_dir(data_dir: str | None = None, origin: str | None = None) -> tuple[str, Path]:
    """Return (format, path) for `--data`, else $CIFAR10_DIR, else the default beside the repo
    (paths.py), else an error naming the options. `origin` says where an explicit `data_dir` came from.

    format is "imagefolder" (train/<class>/*, test/<class>/*) or "torchvision" (cifar-10-batches-py).
    """
    if data_dir:
        candidate, origin = str(data_dir), origin or "--data"
    else:
        candidate, origin = paths.data_source()
    if not candidate:
        raise DataSourceError(
            "No CIFAR-10 data given. Either pass --data DIR (or set CIFAR10_DIR=DIR) pointing at\n"
            "  (a) an ImageFolder tree with train/<class>/*.jpg and test/<class>/*.jpg "
            "(e.g. ../shared/data/cifar10), or\n"
            "  (b) the torchvision format: a folder holding cifar-10-batches-py/ "
            f"(use --download to fetch it when online).\n(The default, {paths.DEFAULT_DATA}, does not exist.)")
    path = Path(candidate).expanduser()
    if (path / TORCHVISION_DIRNAME / "data_batch_1").exists():
        return "torchvision", path / TORCHVISION_DIRNAME
    if path.name == TORCHVISION_DIRNAME and (path / "data_batch_1").exists():
        return "torchvision", path
    if (path / "train").is_dir() and (path / "test").is_dir():
        return "imagefolder", path
    raise DataSourceError(
        f"{path} (from {origin}) is not CIFAR-10 data: expected either train/<class>/ and test/<class>/ "
        f"folders (ImageFolder) or {TORCHVISION_DIRNAME}/data_batch_1..5 + test_batch (torchvision format). "
        f"Pass --data DIR or set CIFAR10_DIR=DIR.")


def download_torchvision(root: str | Path) -> Path:
    """Fetch the official python batches (needs internet). Kept for online users."""
    from torchvision.datasets import CIFAR10
    CIFAR10(str(root), train=True, download=True)
    return Path(root)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def _imagefolder_files(root: Path, split: str) -> list[tuple[Path, int]]:
    split_dir = root / split
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if tuple(classes) != CLASSES:
        raise DataSourceError(f"{split_dir} has class folders {classes}, expected {list(CLASSES)}")
    files = []
    for label, name in enumerate(classes):
        for f in sorted((split_dir / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f, label))
    if not files:
        raise DataSourceError(f"{split_dir} holds no images")
    return files


def _fingerprint_files(files: list[tuple[Path, int]], root: Path) -> str:
    # Paths and sizes, not mtimes: a copy of the same data (e.g. in CI) keeps its cache key.
    h = hashlib.sha256()
    for f, label in files:
        h.update(f"{f.relative_to(root)}|{f.stat().st_size}|{label}\n".encode())
    return h.hexdigest()[:16]


def _decode_rgb32(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape != (32, 32, 3):
        raise DataSourceError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
    return arr


def _load_imagefolder(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    train, test = _imagefolder_files(root, "train"), _imagefolder_files(root, "test")
    files = train + test
    fp = _fingerprint_files(files, root)
    cached = _read_cache(fp)
    if cached is not None:
        return (*cached, fp)
    # PIL releases the GIL while decoding, so threads use both cores without pickling arrays.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = np.stack(list(pool.map(_decode_rgb32, (f for f, _ in files), chunksize=256)))
    labels = np.array([lbl for _, lbl in files], dtype=np.int64)
    is_test = np.array([False] * len(train) + [True] * len(test))
    _write_cache(fp, images, labels, is_test)
    return images, labels, is_test, fp


def _load_torchvision(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    h = hashlib.sha256()
    images, labels, is_test = [], [], []
    for name in names:
        raw = (folder / name).read_bytes()
        h.update(raw)
        # The official CIFAR batches are pickles; they come from a fixed, known URL and carry
        # only arrays, so we restrict the unpickler to builtin containers and numpy arrays.
        batch = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
        is_test.append(np.full(len(batch["labels"]), name == "test_batch"))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(is_test), h.hexdigest()[:16]


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise DataSourceError(f"refusing to unpickle {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _cache_path(fp: str) -> Path:
    return cache_dir() / f"cifar10-{fp}.npz"


def _read_cache(fp: str):
    path = _cache_path(fp)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"], z["labels"], z["is_test"]
    except Exception:  # a corrupt cache is rebuilt, never trusted
        path.unlink(missing_ok=True)
        return None


def _write_cache(fp: str, images, labels, is_test) -> None:
    path = _cache_path(fp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, is_test=is_test)
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
    except OSError:
        pass  # caching is an optimization; a read-only home still works, just slower


def load_cifar10(data_dir: str | None = None, download: bool = False, origin: str | None = None) -> Cifar10:
    """Load all 60k images as uint8 tensors (decoded once, then cached on disk)."""
    if download and not data_dir and paths.data_source()[0] is None:
        data_dir = str(download_torchvision(cache_dir() / "download"))
    fmt, path = resolve_data_dir(data_dir, origin)
    loader = _load_imagefolder if fmt == "imagefolder" else _load_torchvision
    images, labels, is_test, fp = loader(path)
    if len(labels) != 60000:
        raise DataSourceError(f"{path}: found {len(labels)} images, CIFAR-10 has 60000 (50000 train + 10000 test)")
    return Cifar10(
        images=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        labels=torch.from_numpy(labels),
        is_official_test=torch.from_numpy(is_test),
        source=f"{fmt}:{path.resolve()}",
        fingerprint=fp,
    )


def load_cifar10_for(data_dir: str | None, metas: list[dict]) -> Cifar10:
    """CIFAR-10 for commands that start from checkpoints (evaluate, calibrate, ensemble, report):
    --data, else $CIFAR10_DIR, else the folder the checkpoints were trained from, else the default."""
    sources = paths.data_sources(data_dir, paths.recorded_data(metas))
    if len(sources) <= 1:  # an explicit choice, or one candidate: its own full message
        return load_cifar10(sources[0][0], origin=sources[0][1]) if sources else load_cifar10(None)
    errors = []
    for folder, origin in sources:
        try:
            return load_cifar10(folder, origin=origin)
        except (DataSourceError, OSError) as e:
            errors.append(str(e).splitlines()[0])
    raise DataSourceError("; ".join(dict.fromkeys(errors)))


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

@dataclass
class Split:
    name: str
    seed: int
    train: torch.Tensor  # indices into Cifar10.images
    val: torch.Tensor
    test: torch.Tensor

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for part in (self.train, self.val, self.test):
            h.update(np.ascontiguousarray(part.numpy().astype(np.int64)).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]

    def indices(self, subset: str) -> torch.Tensor:
        if subset not in ("train", "val", "test"):
            raise ValueError(f"unknown subset {subset!r}: use train, val or test")
        return getattr(self, subset)


def _stratified(labels: np.ndarray, pool: np.ndarray, fractions: tuple[float, ...], rng) -> list[np.ndarray]:
    """Split `pool` into parts with the given fractions, separately within each class."""
    parts = [[] for _ in fractions]
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        members = members[rng.permutation(len(members))]
        bounds = np.round(np.cumsum(fractions) * len(members)).astype(int)
        start = 0
        for i, stop in enumerate(bounds):
            parts[i].append(members[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]


def make_split(data: Cifar10, name: str = "seed", seed: int = 0) -> Split:
    """Deterministic, non-overlapping train/val/test indices.

    seed:      stratified 80/10/10 of all 60k images (48k/6k/6k), as in the original challenge.
    canonical: official train split 45k/5k (stratified), official 10k test.
    official:  official 50k train, no val, official 10k test (the speed-benchmark protocol).
    """
    labels = data.labels.numpy()
    is_test = data.is_official_test.numpy()
    rng = np.random.default_rng(seed)
    everything = np.arange(len(labels))
    if name == "seed":
        train, val, test = _stratified(labels, everything, (0.8, 0.1, 0.1), rng)
    elif name == "canonical":
        train, val = _stratified(labels, everything[~is_test], (0.9, 0.1), rng)
        test = everything[is_test]
    elif name == "official":
        train, val, test = everything[~is_test], np.array([], dtype=np.int64), everything[is_test]
    else:
        raise ValueError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
    as_t = lambda a: torch.from_numpy(a.astype(np.int64))
    return Split(name=name, seed=seed, train=as_t(train), val=as_t(val), test=as_t(test))
