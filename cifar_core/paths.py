"""Where the lab's folders are: one rule for every entry point (train.py, demo, api, benchmarks).

    folder = the command-line flag, else the environment variable, else the default beside the repo

| folder      | flag            | environment         | default                        |
|-------------|-----------------|---------------------|--------------------------------|
| data        | `--data`        | `CIFAR10_DIR`       | `../shared/data/cifar10`       |
| checkpoints | `--checkpoints` | `CIFAR_CHECKPOINTS` | `checkpoints/` in the repo     |
| exports     | `--exports`     | `CIFAR_EXPORTS`     | `exports/` in the repo         |

Commands that start from a checkpoint (evaluate, calibrate, report) try, between the environment
and the default, the data folder that checkpoint was trained from (its meta.json records it).
An empty environment variable counts as unset.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_ENV, CHECKPOINTS_ENV, EXPORTS_ENV = "CIFAR10_DIR", "CIFAR_CHECKPOINTS", "CIFAR_EXPORTS"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"   # the team's layout: shared/ beside the clone
DEFAULT_CHECKPOINTS = REPO / "checkpoints"
DEFAULT_EXPORTS = REPO / "exports"
DEFAULT_ASSETS = REPO / "demo" / "assets"             # built by python -m demo.build_assets
DEFAULT_EXAMPLES = REPO / "demo" / "examples"         # written by python -m demo.build_assets too


def example_files() -> list[str]:
    """The demo's example images: real CIFAR test images first, then the non-CIFAR photos (whatever
    demo.build_assets wrote). The demo offers them; benchmarks and the warm-up use the same list."""
    files = sorted(DEFAULT_EXAMPLES.glob("cifar_*.png")) + sorted(DEFAULT_EXAMPLES.glob("photo_*"))
    return [str(f) for f in files]


def checkpoints_dir(flag: str | Path | None = None) -> Path:
    """The folder of checkpoint folders (the zoo)."""
    return Path(flag or os.environ.get(CHECKPOINTS_ENV) or DEFAULT_CHECKPOINTS)


def exports_dir(flag: str | Path | None = None) -> Path:
    """The folder of ONNX exports (<name>/fp32.onnx, <name>/int8.onnx)."""
    return Path(flag or os.environ.get(EXPORTS_ENV) or DEFAULT_EXPORTS)


def data_source() -> tuple[str | None, str]:
    """(folder, where it came from) when no --data is given: $CIFAR10_DIR, else the default if it
    exists; (None, "") if neither."""
    sources = data_sources()
    return sources[0] if sources else (None, "")


def data_sources(flag: str | Path | None = None, recorded: list | tuple = ()) -> list[tuple[str, str]]:
    """Candidate data folders in order, each with where it came from (for error messages).

    A flag or the environment variable is the only candidate (an explicit choice is never second-
    guessed); otherwise the folders `recorded` by checkpoints, then the default if it exists."""
    if flag:
        return [(str(flag), "--data")]
    if os.environ.get(DATA_ENV):
        return [(os.environ[DATA_ENV], f"${DATA_ENV}")]
    out = [(str(r), "the checkpoint's meta.json") for r in dict.fromkeys(r for r in recorded if r)]
    if DEFAULT_DATA.is_dir():
        out.append((str(DEFAULT_DATA), "the default beside the repo"))
    return out


def recorded_data(metas: list[dict]) -> list[str]:
    """The data folders checkpoints were trained from (train_config.data, then data.source)."""
    out = []
    for meta in metas:
        trained_from = (meta.get("train_config") or {}).get("data")
        source = (meta.get("data") or {}).get("source", "")
        out += [c for c in (trained_from, source.partition(":")[2] or None) if c]
    return list(dict.fromkeys(out))
