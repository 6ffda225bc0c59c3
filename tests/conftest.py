"""Shared fixtures. Real-data tests read CIFAR10_DIR; outside CI they skip when it is absent,
in CI (CI=true) a missing data folder is a failure, not a skip."""
import os
from pathlib import Path

import pytest

from cifar_core import paths
from cifar_core.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str, folder: str = "benchmarks"):
    """A script of benchmarks/ or scripts/ (not packages) as a module, for tests of its tables and functions."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    return load_script(name, "benchmarks")

keep_freed_memory()  # as train.py does: the 192-px shipped model runs 3x faster without per-batch page faults


# `python -m pytest -m "not slow"` is the fast subset (under 2 minutes on the 2-core CPU); the full suite
# stays the README's test command and CI's. Slow: real training runs, re-measuring the shipped checkpoints
# on real data, one subprocess or server per case (from `python -m pytest --durations=80`, seconds each).
SLOW = (
    "test_shipped.py",                                            # every shipped checkpoint on 6,000 test images
    "test_training.py",                                           # real training runs, torchrun, resume after kill
    "test_api.py",                                                # a uvicorn server with a trained zoo
    "test_train_speed.py",                                        # a real benchmark run
    "test_optim.py::test_a_short_muon_run_learns",
    "test_explain.py::test_faithfulness_of_every_shipped_model",
    "test_frozen.py::test_cached_run_trains_only_the_trunk",
    "test_export.py::test_onnx_matches_pytorch_and_int8_keeps_accuracy",
    "test_ood.py::test_shipped_detector_passes_cifar_test_images_at_the_stated_rate_and_flags_ood",  # 1,000 test images
    "test_distill.py::test_short_distilled_run_learns_from_the_teacher",
    "test_layout.py::test_benchmark_imports_from_any_folder",     # one interpreter per benchmark script
    "test_demo_api.py::test_both_start_commands_parse",
    "test_demo_browser.py::test_layout_reads_in_full_at_desktop_and_phone_width",  # every tab at two widths
    "test_report.py::test_with_data",
    "test_report.py::test_tables_equal_the_meta_values_without_data",  # renders every figure of the report
    "test_demo_api.py::test_the_shipped_app_recognizes_the_shipped_cifar_examples",  # loads the shipped zoo
    "test_ensemble.py::test_cli_calibrate",
    "test_deploy.py::test_the_uploaded_set_starts_the_app",                # a copy of the Space, started as a server
    "test_notebook.py::test_notebook_runs_top_to_bottom",                  # every level on a tiny budget
)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.split("tests/", 1)[-1].startswith(SLOW):
            item.add_marker(pytest.mark.slow)


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
