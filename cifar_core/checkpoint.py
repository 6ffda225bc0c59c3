"""Checkpoints: `<dir>/model.safetensors` + `<dir>/meta.json`, written atomically, loaded with checks.

meta.json holds everything needed to use the weights again (architecture and kwargs, classes,
input size, mean/std, training config, split and its fingerprint, data source, metrics,
history, code version, date), so nothing downstream has to guess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
REQUIRED_META = ("format_version", "model", "model_kwargs", "classes", "spec")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, mismatched or not ours; the message says which."""


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; checkpoints are read by other users (Spaces)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def state_for_saving(model: nn.Module, half: bool) -> dict[str, torch.Tensor]:
    """Float tensors to fp16 when `half` (integer buffers such as BN counters stay as they are)."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        state[k] = (v.half() if half and v.is_floating_point() else v).contiguous()
    return state


def round_trip_fp16(model: nn.Module) -> None:
    """Make the in-memory weights exactly what an fp16 checkpoint will load back, before evaluating."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())


def save_checkpoint(directory: str | Path, model: nn.Module, meta: dict, half: bool = True,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write weights + meta into a temp dir, then swap it into place: never half-written."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "weights_dtype": "float16" if half else "float32",
            "code_version": code_version(), "saved_at": now_iso(), **meta}
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"meta is missing {missing}")
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        if directory.exists():  # keep files that live beside the weights (plots, history)
            for f in directory.iterdir():
                if f.is_file() and f.name not in (WEIGHTS, META):
                    shutil.copy2(f, tmp / f.name)
        (tmp / WEIGHTS).write_bytes(save(state_for_saving(model, half), metadata={"format": "pt"}))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_bytes(payload)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file; a checkpoint is a folder holding {WEIGHTS} and {META}")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    meta_path = directory / META
    if not meta_path.exists():
        raise CheckpointError(f"{directory} has no {META}; is it a checkpoint folder?")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e})") from e
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks required fields {missing}")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format {meta['format_version']}; this code reads up to {FORMAT_VERSION}")
    return meta


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} is missing")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"\x80\x02" or head[:2] == b"PK":
        raise CheckpointError(f"{path} is a pickle/zip (torch.save) file, not safetensors; it is refused "
                              "because unpickling can run code")
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e


def load_checkpoint(directory: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model named in meta.json and load its weights strictly; returns (model, meta)."""
    from .models import create_model, get_spec

    directory = Path(directory)
    meta = read_meta(directory)
    try:
        get_spec(meta["model"])
    except KeyError as e:
        raise CheckpointError(f"{directory}: {e.args[0]}") from e
    state = read_weights(directory / WEIGHTS)
    model = create_model(meta["model"], num_classes=len(meta["classes"]), **meta["model_kwargs"])
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{directory}: weights do not match architecture {meta['model']} {meta['model_kwargs']}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    model.to(device).eval()
    model.spec = type(model.spec)(**{**model.spec.to_dict(), **_spec_fields(meta["spec"])})
    return model, meta


def _spec_fields(saved: dict) -> dict:
    # The saved spec wins: preprocessing must be what the weights were trained with.
    keep = {k: v for k, v in saved.items() if k != "kwargs"}
    for k in ("mean", "std"):
        if k in keep:
            keep[k] = tuple(keep[k])
    return keep
