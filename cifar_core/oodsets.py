"""Out-of-distribution test images, built offline from material nobody here made.

Three groups, each split into a `val` part (to choose a detector and its settings) and a `test` part
(to report it) that share no source image, font or seed:

  photos     random crops of real photos bundled with scikit-image (astronaut, coffee, rocket, Hubble, ...),
             scikit-learn (china, flower) and scikit-image's LFW subset (faces and non-face patches)
  drawn      scikit-learn's handwritten digits, upscaled and tinted, and words rendered with matplotlib's
             bundled DejaVu fonts
  synthetic  Gaussian / uniform noise, random blobs, flat colours, gradients, stripes and checkerboards

Every image goes the way an upload goes (cifar_core.images.to_model_input: centre square crop and a
LANCZOS resize to 32x32), then through the JPEG q75 round trip the CIFAR copy has (PROVENANCE.md: PIL's
default save, 4:2:0), so a detector cannot tell the sets apart by compression alone.

    sets = load_ood_sets()          # built once into ~/.cache/cifar_core/ood/<key>/, then read back
    sets["test"]["images"]          # uint8 N x 3 x 32 x 32; ["group"] and ["source"] say where each came from

The CIFAR class "cat" (scikit-image's chelsea) and the horse silhouette are left out: they are not OOD.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .checkpoint import atomic_write_bytes, atomic_write_json
from .data import cache_dir
from .images import to_model_input

VERSION = 1   # bump when the recipe below changes: the cache key includes it
GROUPS = ("photos", "drawn", "synthetic")

# Photos, split by source image: val and test never crop the same picture.
SKIMAGE_PHOTOS = {
    "val": ("coffee", "hubble_deep_field", "brick", "gravel", "moon", "camera"),
    "test": ("astronaut", "rocket", "immunohistochemistry", "retina", "grass", "coins", "stereo_motorcycle"),
}
SKLEARN_PHOTOS = {"val": ("china.jpg",), "test": ("flower.jpg",)}
# scikit-image's lfw_subset: 100 faces then 100 non-face patches, 25x25 grey
LFW = {"val": (slice(0, 50), slice(100, 150)), "test": (slice(50, 100), slice(150, 200))}
FONTS = {"val": ("DejaVuSans.ttf", "DejaVuSerif.ttf"), "test": ("DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")}
WORDS = ("the quick brown fox jumps over lazy dog lorem ipsum dolor sit amet 2026 CIFAR hello world "
         "menu price total invoice page chapter 42 OK cancel login password ABC xyz").split()
SEEDS = {"val": 101, "test": 202}

# images per split and group (photos: per source image, spread over the sources)
PHOTOS_PER_SPLIT = 640
LFW_PER_SPLIT = 100
DIGITS_PER_SPLIT = 200
TEXT_PER_SPLIT = 200
SYNTHETIC_PER_KIND = 50
SYNTHETIC_KINDS = ("gaussian_noise", "uniform_noise", "blobs", "flat", "gradient", "stripes")


def jpeg_roundtrip(image: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """uint8 3x32x32 -> the same after PIL's default JPEG save at `quality` (how the CIFAR copy is stored)."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).contiguous()


def as_upload(im: Image.Image) -> torch.Tensor:
    return jpeg_roundtrip(to_model_input(im.convert("RGB")))


def random_crop(im: Image.Image, rng: np.random.Generator, min_frac: float = 0.2) -> Image.Image:
    """A random square crop of 20-100% of the shorter side, mirrored half the time."""
    w, h = im.size
    side = int(min(w, h) * rng.uniform(min_frac, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = im.crop((x, y, x + side, y + side))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _skimage(name: str) -> Image.Image:
    from skimage import data as skdata
    image = getattr(skdata, name)()
    return Image.fromarray(image[0] if name == "stereo_motorcycle" else image)  # (left, right, disparity)


def _sklearn(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image
    return Image.fromarray(load_sample_image(name))


def photo_uploads(split: str, rng: np.random.Generator | None = None) -> tuple[list[Image.Image], list[str]]:
    """The photos group as uploaded, before the 32x32 reduction: crops at their own resolution (up to 512 px)
    and LFW's 25x25 patches. `rng` defaults to the one build_split gives the photos group."""
    rng = rng if rng is not None else np.random.default_rng(SEEDS[split] + 1000 * GROUPS.index("photos"))
    sources = [(f"scikit-image data.{n}", lambda n=n: _skimage(n)) for n in SKIMAGE_PHOTOS[split]]
    sources += [(f"scikit-learn load_sample_image('{n}')", lambda n=n: _sklearn(n)) for n in SKLEARN_PHOTOS[split]]
    per_source = PHOTOS_PER_SPLIT // len(sources)
    uploads, names = [], []
    for name, load in sources:
        im = load()
        for _ in range(per_source):
            uploads.append(random_crop(im, rng))
            names.append(name)
    from skimage import data as skdata
    faces = skdata.lfw_subset()  # float 0..1, 200 x 25 x 25
    picks = np.concatenate([np.arange(200)[s] for s in LFW[split]])
    for i in picks[:LFW_PER_SPLIT]:
        uploads.append(Image.fromarray(np.uint8(np.round(faces[i] * 255))))
        names.append(f"scikit-image data.lfw_subset()[{i}] ({'face' if i < 100 else 'non-face patch'})")
    return uploads, names


def photos(split: str, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[str]]:
    uploads, names = photo_uploads(split, rng)
    return [as_upload(im) for im in uploads], names


def _font_file(name: str) -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def drawn(split: str, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[str]]:
    from sklearn.datasets import load_digits
    digits = load_digits().images  # 1797 x 8 x 8, 0..16
    parity = 0 if split == "val" else 1
    images, names = [], []
    for i in rng.choice(np.arange(parity, len(digits), 2), DIGITS_PER_SPLIT, replace=False):
        ink, paper = np.array(_colour(rng)), np.array(_colour(rng))
        a = digits[i][..., None] / 16.0
        rgb = np.uint8(np.round(paper * (1 - a) + ink * a))
        im = Image.fromarray(rgb).resize((64, 64), Image.Resampling.BILINEAR)
        images.append(as_upload(im))
        names.append(f"scikit-learn load_digits()[{i}]")
    fonts = FONTS[split]
    for k in range(TEXT_PER_SPLIT):
        font_name = fonts[k % len(fonts)]
        size = int(rng.integers(14, 40))
        font = ImageFont.truetype(str(_font_file(font_name)), size)
        im = Image.new("RGB", (96, 96), _colour(rng))
        draw = ImageDraw.Draw(im)
        y = int(rng.integers(0, 20))
        while y < 96:
            line = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
            draw.text((int(rng.integers(-10, 10)), y), line, fill=_colour(rng), font=font)
            y += size + int(rng.integers(0, 8))
        images.append(as_upload(im))
        names.append(f"text in matplotlib's {font_name} ({size} px)")
    return images, names


def synthetic(split: str, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[str]]:
    images, names = [], []
    n = 64
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    for kind in SYNTHETIC_KINDS:
        for _ in range(SYNTHETIC_PER_KIND):
            if kind == "gaussian_noise":
                a = rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), (n, n, 3))
            elif kind == "uniform_noise":
                a = rng.uniform(0, 255, (n, n, 3))
            elif kind == "blobs":
                a = np.zeros((n, n, 3)) + np.array(_colour(rng))
                for _ in range(int(rng.integers(2, 8))):
                    cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
                    w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
                    a = a * (1 - w) + np.array(_colour(rng)) * w
            elif kind == "flat":
                a = np.zeros((n, n, 3)) + np.array(_colour(rng))
            elif kind == "gradient":
                t = np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy
                t = (t - t.min()) / max(np.ptp(t), 1e-6)
                a = np.array(_colour(rng)) * (1 - t[..., None]) + np.array(_colour(rng)) * t[..., None]
            else:  # stripes and checkerboards
                period = rng.uniform(0.05, 0.4)
                s = np.floor(xx / period) + (np.floor(yy / period) if rng.random() < 0.5 else 0)
                a = np.where((s % 2)[..., None] > 0, np.array(_colour(rng)), np.array(_colour(rng)))
            images.append(as_upload(Image.fromarray(np.uint8(np.clip(a, 0, 255)))))
            names.append(f"synthetic {kind}")
    return images, names


BUILDERS = {"photos": photos, "drawn": drawn, "synthetic": synthetic}


def build_split(split: str) -> dict:
    """{"images": uint8 N x 3 x 32 x 32, "group": list[str], "source": list[str]} for one split."""
    images, groups, sources = [], [], []
    for g, group in enumerate(GROUPS):
        rng = np.random.default_rng(SEEDS[split] + 1000 * g)
        ims, names = BUILDERS[group](split, rng)
        images += ims
        groups += [group] * len(ims)
        sources += names
    return {"images": torch.stack(images), "group": groups, "source": sources}


def cache_key() -> str:
    """Changes with the recipe and with the packages the material comes from."""
    import PIL
    import matplotlib
    import skimage
    import sklearn
    parts = [str(VERSION), skimage.__version__, sklearn.__version__, matplotlib.__version__, PIL.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def provenance() -> dict:
    return {
        "recipe": f"cifar_core/oodsets.py, version {VERSION}",
        "groups": {"photos": "random square crops (20-100% of the shorter side, mirrored half the time) of "
                             "scikit-image and scikit-learn sample photos, plus scikit-image's LFW subset",
                   "drawn": "scikit-learn digits (8x8, tinted, upscaled) and words rendered with matplotlib's "
                            "DejaVu fonts",
                   "synthetic": ", ".join(SYNTHETIC_KINDS)},
        "val_sources": {"photos": list(SKIMAGE_PHOTOS["val"]) + list(SKLEARN_PHOTOS["val"]) + ["lfw 0-49, 100-149"],
                        "drawn": ["digits, even indices"] + list(FONTS["val"]), "synthetic": f"seed {SEEDS['val']}"},
        "test_sources": {"photos": list(SKIMAGE_PHOTOS["test"]) + list(SKLEARN_PHOTOS["test"]) +
                         ["lfw 50-99, 150-199"],
                         "drawn": ["digits, odd indices"] + list(FONTS["test"]), "synthetic": f"seed {SEEDS['test']}"},
        "processing": "cifar_core.images.to_model_input (centre square, LANCZOS to 32x32), then JPEG q75 "
                      "(PIL default, as the CIFAR copy)",
    }


def ood_cache_dir() -> Path:
    return cache_dir() / "ood" / cache_key()


def _write(folder: Path, split: str, data: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=data["images"].numpy(), group=np.array(data["group"]),
                        source=np.array(data["source"]))
    atomic_write_bytes(folder / f"{split}.npz", buffer.getvalue())  # a killed build leaves no half file


def _read(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {"images": torch.from_numpy(z["images"]), "group": z["group"].tolist(),
                "source": z["source"].tolist()}


def load_ood_sets(rebuild: bool = False, verbose: bool = True) -> dict[str, dict]:
    """{"val": ..., "test": ...}, built on first use (a few seconds) and cached on disk."""
    folder = ood_cache_dir()
    out = {}
    for split in ("val", "test"):
        path = folder / f"{split}.npz"
        if rebuild or not path.exists():
            if verbose:
                print(f"building the {split} OOD set into {folder}", flush=True)
            _write(folder, split, build_split(split))
        out[split] = _read(path)
    if not (folder / "PROVENANCE.json").exists() or rebuild:
        counts = {s: {g: out[s]["group"].count(g) for g in GROUPS} for s in out}
        atomic_write_json(folder / "PROVENANCE.json", {**provenance(), "counts": counts})
    return out
