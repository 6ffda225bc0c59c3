"""Shared fixtures. Real-data tests read CIFAR10_DIR; outside CI they skip when it is absent,
in CI (CI=true) a missing data folder is a failure, not a skip."""
import os
from pathlib import Path

import pytest

from cifar_core import paths
from cifar_core.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent

keep_freed_memory()  # as train.py does: the 192-px shipped model runs 3x faster without per-batch page faults


def _data_dir():
    folder, _ = paths.data_source()  # $CIFAR10_DIR, else ../shared/data/cifar10 (as every command finds it)
    return folder if folder and Path(folder).is_dir() else None


@pytest.fixture(scope="session")
def data_dir():
    path = _data_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CIFAR10_DIR is not set or missing in CI: real-data tests must run")
        pytest.skip("real CIFAR-10 data not found: set CIFAR10_DIR to the ImageFolder copy (../shared/data/cifar10)")
    return path


@pytest.fixture(scope="session")
def cifar(data_dir):
    from cifar_core.data import load_cifar10
    return load_cifar10(data_dir)
