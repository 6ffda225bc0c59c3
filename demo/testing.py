"""Helpers for the demo's tests and benchmark: a tiny model zoo that needs no data or training,
and a launched app on a free port."""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import torch

from cifar_core.checkpoint import save_checkpoint
from cifar_core.data import CLASSES
from cifar_core.models import create_model


def _fake_metrics(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cm = torch.randint(0, 20, (10, 10), generator=g) + torch.eye(10, dtype=torch.long) * 400
    per_class = (cm.diag().float() / cm.sum(1)).tolist()
    return {"test": {"n": int(cm.sum()), "accuracy": float(cm.diag().sum() / cm.sum()), "nll": 0.5, "ece": 0.02,
                     "per_class_accuracy": dict(zip(CLASSES, per_class)), "confusion": cm.tolist()},
            "tta": 0}


def make_fake_zoo(root: str | Path, n_models: int = 2) -> Path:
    """n random-init cifar_cnn_small checkpoints (different seeds, so they can disagree). The first has a
    full meta (history, metrics); the last has the bare minimum, as an old or foreign checkpoint might."""
    root = Path(root)
    for i in range(n_models):
        torch.manual_seed(i)
        model = create_model("cifar_cnn_small")
        model.init_from_data(torch.randn(64, 3, 32, 32))
        meta = {"model": model.spec.name, "model_kwargs": model.model_kwargs, "classes": list(CLASSES),
                "spec": model.spec.to_dict(), "params": sum(p.numel() for p in model.parameters())}
        if i < n_models - 1 or n_models == 1:
            meta.update(
                metrics=_fake_metrics(i), temperature=1.5,
                split={"name": "seed", "seed": 0, "fingerprint": "test", "sizes": {}},
                history=[{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 + 0.1 * e, "val_loss": 2.1 / e,
                          "val_acc": 0.28 + 0.1 * e} for e in range(1, 4)])
        save_checkpoint(root / f"fake_{i}", model.eval(), meta)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(app, **launch_overrides):
    """Launch in this process on a free port without blocking; yields the URL; always closes."""
    from demo.app import launch_kwargs
    port = free_port()
    app.launch(**launch_kwargs(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                               **launch_overrides))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
