"""The repository as a package (issue 22): every entry point imports `cifar_core` the same way,
from any folder, because `pip install -e .` installed it; no script edits sys.path to find it."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = "install the repository as a package first: pip install -e . (README, Quick start)"


def tracked_python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked archive): every .py outside the venv
        return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts]
    return [ROOT / line for line in out.stdout.splitlines()]


def test_no_script_edits_sys_path():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in tracked_python_files()
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"sys\.path\.(insert|append|extend)\(|sys\.path\[.*\]\s*=", line)]
    assert not offenders, f"sys.path edits (the package is installed instead): {offenders}"


def test_package_is_installed_from_this_checkout():
    import cifar_core
    import train
    assert Path(cifar_core.__file__).resolve().parent == ROOT / "cifar_core", INSTALL_HINT
    assert Path(train.__file__).resolve() == ROOT / "train.py", INSTALL_HINT


BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_imports_from_any_folder(script, tmp_path):
    # run from a foreign folder: sys.path[0] is benchmarks/, so only the installed package can
    # provide cifar_core (and demo, train) here
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), f"{script}: {r.stderr[-2000:]}\n{INSTALL_HINT}"


def test_console_script():
    exe = shutil.which("cifar-train", path=str(Path(sys.executable).parent))
    assert exe, f"no cifar-train next to {sys.executable}: {INSTALL_HINT}"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--level" in r.stdout, r.stderr[-2000:]


def imported_packages(path: Path) -> set[str]:
    """Top-level names of everything `path` imports (absolute imports; relative ones stay inside)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# who may import whom: cifar_core at the bottom; the entry points above it, never sideways
# (the one exception: api/app.py mounts the demo's Gradio app under /demo)
ALLOWED_SIDEWAYS = {("api/app.py", "demo")}


@pytest.mark.parametrize("package,forbidden", [
    ("cifar_core", {"demo", "api", "train", "benchmarks", "tests"}),
    ("demo", {"api", "train", "benchmarks"}),
    ("api", {"demo", "train", "benchmarks"}),
])
def test_imports_read_top_down(package, forbidden):
    bad = [(str(p.relative_to(ROOT)), name) for p in sorted((ROOT / package).rglob("*.py"))
           for name in imported_packages(p) & forbidden
           if (str(p.relative_to(ROOT)), name) not in ALLOWED_SIDEWAYS]
    assert not bad, f"{package} imports sideways or upwards: {bad}"


def test_slow_list_names_existing_tests():
    from conftest import SLOW
    for entry in SLOW:
        file, _, name = entry.partition("::")
        assert (ROOT / "tests" / file).exists(), entry
        assert not name or f"def {name}" in (ROOT / "tests" / file).read_text(), f"stale slow entry {entry}"


def test_readme_layout_is_the_map_of_the_tree():
    """The README's Layout section is the map of record: every cifar_core module and every top-level
    folder of code is named there, so a newcomer finds where each concern lives."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    modules = [p.stem for p in (ROOT / "cifar_core").glob("*.py") if p.stem != "__init__"]
    missing = [m for m in modules if not re.search(rf"\b{m}(\.py)?\b", layout)]
    folders = [d for d in ("cifar_core", "demo", "api", "tests", "benchmarks", "scripts", "checkpoints")
               if (ROOT / d).is_dir() and f"{d}/" not in layout]
    assert not missing and not folders, f"README Layout misses modules {missing} / folders {folders}"
