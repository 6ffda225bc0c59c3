"""notebooks/walkthrough.ipynb: paired with its jupytext source, committed without outputs, and executed top to
bottom on the real data (a failing cell fails the test)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
SOURCE = ROOT / "notebooks" / "walkthrough.py"


def test_notebook_is_paired_with_its_source_and_has_no_outputs():
    import jupytext
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), \
        "commit the notebook without outputs"
    paired = jupytext.read(SOURCE)
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in paired.cells], \
        "walkthrough.ipynb and walkthrough.py differ: jupytext --sync notebooks/walkthrough.py"


def test_notebook_runs_top_to_bottom(data_dir, monkeypatch):
    """Every cell executes (nbclient, the python3 kernel of this environment) within the time limit."""
    import nbformat
    monkeypatch.setenv("CIFAR10_DIR", str(Path(data_dir).resolve()))  # the kernel runs in notebooks/
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a failing cell
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    # the class grid, per model vs ensemble, Grad-CAM, reliability: all shown, also after train() saved its plots
    assert len(figures) == 4, f"{len(figures)} figures displayed"
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "level 1" in text and "level 3 test accuracy" in text and "int8 agrees with fp32" in text
    assert "tf_efficientnet_lite0" in text and "typicality" in text and "flagged" in text
