"""scripts/deploy_space.py: the Space gets an allow-listed set, the dry run says what, and that exact set
starts the app (copied to an empty folder, started there, asked over HTTP)."""
import os
import subprocess
import sys
import time

import pytest

from cifar_core.data import CLASSES
from conftest import ROOT, load_script
from demo.testing import free_port

deploy = load_script("deploy_space", "scripts")


def front_matter() -> dict:
    import yaml
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_dry_run_lists_every_file_and_the_total_offline(capsys, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("a dry run must not talk to the Hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    assert deploy.main(["--dry-run", "--repo", "someone/cifar-lab"]) == 0
    out = capsys.readouterr().out
    files = deploy.space_files()
    for f in files:
        assert f in out
    assert f"{len(files)} files, " in out and "MB in all" in out and "nothing uploaded" in out
    for needed in ("app.py", "README.md", "requirements.txt", "cifar_core/serving.py", "demo/app.py",
                   "demo/style.css", "demo/head.html", "demo/assets/ood.safetensors", "checkpoints/ensemble.json",
                   "checkpoints/vit_cifar/model.safetensors", "exports/cifar_cnn/int8.onnx"):
        assert needed in files, needed
    assert any(f.startswith("demo/examples/photo_") for f in files)
    assert not any(f.startswith(deploy.DENIED) for f in files)
    assert not any(f.endswith(("fp32.onnx", ".pyi")) or "/resume/" in f for f in files)


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        deploy.main([])                       # neither --repo nor --dry-run
    assert "--repo USER/NAME is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        deploy.main(["--repo", "no-slash"])
    assert "USER/NAME" in capsys.readouterr().err


def test_the_space_config_and_requirements():
    meta = front_matter()
    import gradio
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert meta["app_file"] in deploy.space_files() and meta["suggested_hardware"] == "cpu-basic"
    assert str(meta["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"
    # the Space installs requirements.txt: runtime only, every line pinned, no test tools
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    packages = [ln for ln in lines if ln]
    assert packages and all("==" in p for p in packages)
    names = {p.split("==")[0].split("[")[0].lower() for p in packages}
    assert not names & {"pytest", "playwright", "httpx", "scikit-image", "ruff"}
    assert {"torch", "gradio", "safetensors", "pytorch-ood"} <= names


def test_the_uploaded_set_starts_the_app(tmp_path):
    """Exactly the files the deploy sends, in an empty folder, started the way Spaces starts them (python app.py),
    answer /predict with the shipped models and the shipped OOD detector."""
    from gradio_client import Client, handle_file
    space = deploy.copy_set(deploy.space_files(), tmp_path / "space")
    env = {k: v for k, v in os.environ.items() if k not in ("CIFAR_CHECKPOINTS", "CIFAR_EXPORTS")}
    where = subprocess.run([sys.executable, "-c", "import cifar_core, demo; print(cifar_core.__file__, demo.__file__)"],
                           cwd=space, env=env, capture_output=True, text=True, check=True).stdout
    assert where.count(str(space)) == 2, f"the copy must import its own packages, not the checkout's: {where}"
    port = free_port()
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1")
    log = tmp_path / "space.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        client = None
        while client is None:
            assert proc.poll() is None, f"the app exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the app did not answer in 180 s:\n{log.read_text()[-3000:]}"
            try:
                client = Client(url, verbose=False)
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(1)
        label, _, notice, ood = client.predict(handle_file(str(space / "demo/examples/cifar_ship.png")),
                                               api_name="/predict")
        assert label["label"] in CLASSES
        assert ood["available"], notice   # the shipped detector belongs to the shipped checkpoints
    finally:
        proc.terminate()
        proc.wait(30)
