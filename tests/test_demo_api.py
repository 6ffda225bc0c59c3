"""The demo's named endpoints through gradio_client against a launched app: good inputs give
well-formed answers, bad inputs give a clear error, and the app keeps serving afterwards."""
import io
import re
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from cifar_core.data import CLASSES  # noqa: E402
from demo.app import build_app  # noqa: E402
from cifar_core.serving import Lab  # noqa: E402
from demo.tab_classify import example_files  # noqa: E402
from demo.testing import launched, make_fake_zoo  # noqa: E402

MODELS = ["fake_0", "fake_1"]
EXPORTS = Path(__file__).resolve().parent.parent / "exports"   # the shipped int8 ONNX edge models
EDGE = "cifar_cnn_small_distilled-int8"                          # the smallest file: the default edge model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_fake_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def lab(zoo):
    return Lab(zoo, exports=EXPORTS)


@pytest.fixture(scope="module")
def client(lab):
    with launched(build_app(lab)) as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8))
    made = {}

    def put(name, payload):
        made[name] = d / name
        made[name].write_bytes(payload)

    def enc(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()
    put("photo.png", enc(photo, "PNG"))
    put("photo.jpg", enc(photo, "JPEG"))
    put("rgba.png", enc(photo.convert("RGBA"), "PNG"))
    put("gray.webp", enc(photo.convert("L"), "WEBP"))
    put("cmyk.jpg", enc(photo.convert("CMYK"), "JPEG"))
    put("tiny.bmp", enc(Image.new("RGB", (1, 1), (200, 10, 10)), "BMP"))
    put("16bit.tiff", enc(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "TIFF"))
    put("notes.txt", b"definitely not an image")
    put("empty.png", b"")
    jpeg = enc(photo.resize((400, 400)), "JPEG")
    put("truncated.jpg", jpeg[: len(jpeg) // 3])

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    put("bomb.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return made


def test_method_list_matches_cifar_core():
    from cifar_core.explain import METHODS, SLOW_METHODS
    from demo.tab_gradcam import CAM_METHODS, SLOW_METHODS as SAID_SLOW
    assert list(CAM_METHODS) == list(METHODS)
    assert set(SAID_SLOW) == SLOW_METHODS  # the picker warns about exactly the methods that run apart


def test_a_slow_cam_run_does_not_hold_the_served_models(lab, files, monkeypatch):
    """While Score-CAM runs (blocked here until released), a prediction and a fast Grad-CAM of the same
    model still answer: the slow method runs on a private copy of the model, with its own lock."""
    import threading
    from cifar_core import explain as explain_module
    real_explain, started, release = explain_module.explain, threading.Event(), threading.Event()

    def slow_explain(predictor, image, method, target):
        if method == "scorecam":
            with predictor.lock:  # as the real one holds it for its whole run
                started.set()
                assert release.wait(60)
        return real_explain(predictor, image, method, target)
    monkeypatch.setattr(explain_module, "explain", slow_explain)
    image = lab.decode(files["photo.jpg"].read_bytes())
    other = lab.decode(files["photo.png"].read_bytes())
    slow = threading.Thread(target=lab.explanation, args=(image, "fake_0", "scorecam", 0))
    slow.start()
    try:
        assert started.wait(30)
        done = threading.Event()
        fast = threading.Thread(target=lambda: (lab.predict(other), lab.explanation(other, "fake_0", "gradcam", 1),
                                                done.set()))
        fast.start()
        assert done.wait(60), "the served model waited for the slow run"
        assert slow.is_alive()  # the slow run was still going all along
    finally:
        release.set()
        slow.join(60)
    assert lab._explainer("fake_0", "scorecam").model is not lab.by_name["fake_0"].predictor.model
    assert lab._explainer("fake_0", "gradcam") is lab.by_name["fake_0"].predictor


def test_only_the_named_endpoints_are_public(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/predict", "/predict_edge", "/compare", "/explain"}


@pytest.mark.parametrize("name", ["photo.png", "photo.jpg", "rgba.png", "gray.webp", "cmyk.jpg", "tiny.bmp",
                                  "16bit.tiff"])
def test_predict_accepts_any_image(client, files, name):
    label, seen, notice, ood = client.predict(handle_file(str(files[name])), api_name="/predict")
    assert label["label"] in CLASSES
    top5 = label["confidences"]
    assert len(top5) == 5 and all(0 <= c["confidence"] <= 1 for c in top5)
    assert top5 == sorted(top5, key=lambda c: -c["confidence"])
    assert Image.open(seen).size[0] >= 32
    assert notice  # either the OOD notice or the in-distribution line


def test_classify_says_how_long_its_answer_took(client, files):
    """The Classify notice ends with the answer's time on the server: computed, then from the cache."""
    path = handle_file(str(files["photo.jpg"]))
    first = client.predict(path, api_name="/predict")[2]
    again = client.predict(path, api_name="/predict")[2]
    assert re.search(r"Answered in \*\*[\d.]+ ms\*\* on the server \(decode [\d.]+, \d+ model\(s\) \d+", first) or \
        "from its cache" in first, first  # an earlier test may have classified this file already
    assert re.search(r"Answered in \*\*[\d.]+ ms\*\* on the server, from its cache \(first computed in \d+ ms",
                     again), again


def test_predict_on_shipped_examples(client):
    examples = example_files()
    assert any("cifar_" in e for e in examples) and any("photo_" in e for e in examples)
    for path in examples[:3]:
        label, _, _, _ = client.predict(handle_file(path), api_name="/predict")
        assert label["label"] in CLASSES


@pytest.mark.parametrize("name,message", [
    ("notes.txt", "not an image"), ("empty.png", "empty"), ("truncated.jpg", "damaged or incomplete"),
    ("bomb.png", "too large|limit")])
def test_bad_uploads_give_a_clear_error_and_the_app_survives(client, files, name, message, capfd):
    capfd.readouterr()
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(files[name])), api_name="/predict")
    # the user's mistake is not a server fault: Gradio prints no traceback for it (the server runs in this process)
    assert "Traceback" not in capfd.readouterr().err
    label, _, _, _ = client.predict(handle_file(str(files["photo.png"])), api_name="/predict")
    assert label["label"] in CLASSES


def test_missing_image_is_explained(client):
    with pytest.raises(AppError, match="Upload an image"):
        client.predict(None, api_name="/predict")


def test_compare_lists_every_model_and_the_ensemble(client, files):
    badge, table = client.predict(handle_file(str(files["photo.jpg"])), 3, api_name="/compare")
    assert table["headers"] == ["model", "top-1", "top-2", "top-3", "latency ms"]
    assert [row[0] for row in table["data"]] == MODELS + ["ensemble"]
    assert all(row[-1] >= 0 for row in table["data"])
    assert "Agree" in badge or "Disagree" in badge


def test_compare_rejects_bad_k(client, files):
    with pytest.raises(AppError, match="k must be|less than minimum"):
        client.predict(handle_file(str(files["photo.jpg"])), 0, api_name="/compare")


def test_explain_gives_one_overlay_per_model_plus_ensemble(client, files):
    gallery, label = client.predict(handle_file(str(files["photo.png"])), MODELS, "gradcam",
                                    "predicted (ensemble)", 0.5, False, True, api_name="/explain")
    assert gallery[0]["caption"].startswith("input")
    maps = gallery[1:]
    assert [g["caption"].split(":")[0] for g in maps] == MODELS + ["ensemble"]
    target = label["label"]
    assert all(f": {target} " in g["caption"] for g in maps)  # one shared target: the ensemble's class
    assert Image.open(maps[0]["image"]).size == (256, 256)


def test_explain_retargets_every_map(client, files):
    gallery, _ = client.predict(handle_file(str(files["photo.png"])), MODELS[:1], "gradcam++", "ship", 0.3, True,
                                False, api_name="/explain")
    assert len(gallery) == 2 and ": ship " in gallery[1]["caption"]


@pytest.mark.parametrize("args,message", [
    (([], "gradcam", "predicted (ensemble)"), "at least one model"),
    ((["nope"], "gradcam", "predicted (ensemble)"), "nope"),
    ((MODELS, "magic", "predicted (ensemble)"), "unknown method|not in the list of choices"),
    ((MODELS, "gradcam", "unicorn"), "unknown class|not in the list of choices"),
])
def test_explain_bad_arguments(client, files, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(files["photo.png"])), *args, 0.5, False, True, api_name="/explain")


def test_predict_edge_serves_the_int8_file(client, lab, files):
    """The edge option: the int8 ONNX model answers, and says which file, that it is int8, its latency,
    and that it has no Grad-CAM; its probabilities are the cifar_core edge model's own."""
    label, note = client.predict(handle_file(str(files["photo.png"])), api_name="/predict_edge")  # default model
    assert label["label"] in CLASSES and len(label["confidences"]) == 5
    assert f"{EDGE} → **{label['label']}**" in note
    assert "`exports/cifar_cnn_small_distilled/int8.onnx`" in note and "**int8**" in note
    assert "weights int8 per-channel, activations uint8" in note
    assert re.search(r"\*\*Latency\*\*: \d+\.\d ms", note)
    assert "Grad-CAM: not available for edge models" in note and "Full ensemble" in note
    probs, _ = lab.edge[EDGE].predict(lab.decode(str(files["photo.png"])))
    top = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert top == pytest.approx({CLASSES[i]: float(probs[i]) for i in np.argsort(-probs)[:5]}, abs=1e-5)

    label, note = client.predict(handle_file(str(files["gray.webp"])), "cifar_cnn-int8", api_name="/predict_edge")
    assert label["label"] in CLASSES and "`exports/cifar_cnn/int8.onnx`" in note


@pytest.mark.parametrize("args,message", [
    (("photo.png", "nope-int8"), "nope-int8"),
    (("notes.txt", EDGE), "not an image"),
    ((None, EDGE), "Upload an image"),
])
def test_predict_edge_bad_arguments(client, files, args, message):
    name, model = args
    upload = handle_file(str(files[name])) if name else None
    with pytest.raises(AppError, match=message):
        client.predict(upload, model, api_name="/predict_edge")


def test_edge_models_load_once_and_have_no_gradcam(zoo, files):
    lab = Lab(zoo, exports=EXPORTS)
    assert lab._edge is None  # nothing loaded until the edge option is first needed
    assert lab.edge is lab.edge and lab.edge_names == ["cifar_cnn-int8", EDGE] and lab.default_edge == EDGE
    with pytest.raises(KeyError, match="no Grad-CAM"):
        lab.explain(lab.decode(str(files["photo.png"])), [EDGE], "gradcam", None)


def test_missing_or_broken_exports_only_cost_the_edge_option(zoo, tmp_path, files):
    import shutil

    import gradio as gr

    from demo.tab_classify import classify_edge
    exports = tmp_path / "exports"
    for name, payload in {"broken": b"not an onnx file", "truncated": (EXPORTS / "cifar_cnn" / "int8.onnx").read_bytes()[:4096]}.items():
        (exports / name).mkdir(parents=True)
        (exports / name / "int8.onnx").write_bytes(payload)
    (exports / "empty").mkdir()
    (exports / "good").mkdir()
    shutil.copy(EXPORTS / "cifar_cnn_small_distilled" / "int8.onnx", exports / "good" / "int8.onnx")
    lab = Lab(zoo, exports=exports)
    with pytest.warns(UserWarning, match="skipping edge model"):
        assert lab.edge_names == ["good-int8"]
    assert len(lab.edge_problems) == 2 and any("broken" in p for p in lab.edge_problems)
    label, note = classify_edge(lab, str(files["photo.png"]))
    assert max(label, key=label.get) in CLASSES and "good/int8.onnx" in note

    nothing = Lab(zoo, exports=tmp_path / "no-such-folder")
    app = build_app(nothing)  # builds and serves the zoo; the edge choice is shown disabled with the reason
    serve = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "serve")
    assert serve.interactive is False and "edge unavailable" in serve.info
    with pytest.raises(gr.Error, match="No edge model is loaded"):
        classify_edge(nothing, str(files["photo.png"]))


def test_concurrent_clients_all_get_answers(client, files):
    def one(i):
        name = ["photo.png", "photo.jpg", "gray.webp", "tiny.bmp"][i % 4]
        return client.predict(handle_file(str(files[name])), api_name="/predict")[0]["label"]
    with ThreadPoolExecutor(4) as pool:
        assert all(label in CLASSES for label in pool.map(one, range(8)))


def test_full_queue_is_reported(lab, files):
    """With room for one waiting request, a burst must be partly refused with the queue-full message."""
    with launched(build_app(lab, queue_size=1, workers=1)) as url:
        c = Client(url, verbose=False)
        jobs = [c.submit(handle_file(str(files["photo.png"])), MODELS, "scorecam", "cat", 0.5, False, True,
                         api_name="/explain") for _ in range(8)]
        errors = []
        for job in jobs:
            try:
                job.result(timeout=120)
            except Exception as e:  # noqa: BLE001 - the refusal type varies with the client version
                errors.append(str(e))
        assert errors and all("full" in e.lower() for e in errors), errors
        assert len(errors) < len(jobs)  # the ones that got in were answered


@pytest.mark.parametrize("command", [["-m", "demo"], ["app.py"]])
def test_both_start_commands_parse(command):
    """`python -m demo` and `python app.py` (how Spaces starts it: README's app_file) import the same app."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, *command, "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--checkpoints" in out.stdout and "--mcp" in out.stdout


def test_inline_data_url_uploads_reach_our_decoder(files):
    """Webcam/paste payloads can arrive as data: URLs; they must go through cifar_core.images too."""
    import base64

    from gradio.data_classes import ImageData

    from cifar_core.images import decode_for_model
    from demo.upload import UploadImage
    payload = base64.b64encode(files["photo.png"].read_bytes()).decode()
    raw = UploadImage().preprocess(ImageData(url=f"data:image/png;base64,{payload}"))
    assert decode_for_model(raw).shape == (3, 32, 32)
    assert UploadImage().preprocess(ImageData(path=str(files["notes.txt"]))) == str(files["notes.txt"])


def test_the_shipped_app_recognizes_the_shipped_cifar_examples():
    """The app as users get it (shipped checkpoints, shipped assets) over HTTP: the real models
    must get the real CIFAR example images right, and say they look like CIFAR-10."""
    shipped = Lab()  # checkpoints/ of the repository
    cifar_examples = [p for p in example_files() if Path(p).name.startswith("cifar_")]
    assert len(cifar_examples) == 10
    with launched(build_app(shipped)) as url:
        client = Client(url, verbose=False)
        correct = passed = 0
        for path in cifar_examples:
            label, _, notice, ood = client.predict(handle_file(path), api_name="/predict")
            correct += label["label"] == Path(path).stem.removeprefix("cifar_")
            passed += not ood["flagged"] and notice.startswith("Looks like CIFAR-10")
        assert correct >= 8, f"the shipped ensemble got {correct}/10 shipped CIFAR examples right"
        assert passed >= 9, f"only {passed}/10 shipped CIFAR examples pass the out-of-distribution check"
        # a photo of none of the classes is flagged, in words and as data, with the score and the threshold
        astronaut = next(p for p in example_files() if "astronaut" in p)
        _, _, notice, ood = client.predict(handle_file(astronaut), api_name="/predict")
        assert ood["available"] and ood["flagged"] and ood["score"] < ood["threshold"]
        assert "doesn't look like any of the 10 CIFAR-10 classes" in notice and f"{ood['threshold']:.2f}" in notice
        badge, _ = client.predict(handle_file(astronaut), 3, api_name="/compare")
        assert "Out-of-distribution score" in badge and "flagged" in badge


def test_mistakes_selection_is_described_even_when_empty():
    """The Mistakes gallery says what it shows; a diagonal cell (no mistakes) says the ensemble got them right."""
    from types import SimpleNamespace
    from demo.tab_mistakes import describe_selection
    cm = [[0] * 10 for _ in range(10)]
    cm[3][3], cm[3][5], cm[5][3] = 840, 47, 0
    lab = SimpleNamespace(assets={"ensemble_test": {"confusion": cm}})
    mistakes = SimpleNamespace(labels=np.zeros(96))
    assert "got all 840 of these test images right" in describe_selection(lab, mistakes, "cat", "cat", 0)
    assert describe_selection(lab, mistakes, "cat", "dog", 12).startswith("Showing 12")
    empty = describe_selection(lab, mistakes, "dog", "cat", 0)
    assert "No shipped mistakes for true dog and predicted cat" in empty and "made 0 such" in empty
    assert "all classes" in describe_selection(lab, mistakes, "any", "any", 96)
    no_assets = SimpleNamespace(assets={})
    assert "got all of these" in describe_selection(no_assets, mistakes, "cat", "cat", 0)


def test_explain_reports_progress_per_model(lab, files):
    """Lab.explain calls progress before each model's map (the demo shows it, a slow method runs for seconds)."""
    calls = []
    image = lab.decode(files["photo.png"].read_bytes())
    tiles = lab.explain(image, MODELS, "gradcam", None, progress=lambda done, total, model: calls.append((done, total, model)))
    assert calls == [(0, 2, "fake_0"), (1, 2, "fake_1")] and len(tiles) == 3


def test_mcp_serves_the_named_endpoints_as_described_tools(lab, files):
    """`python -m demo --mcp`: the four named endpoints are MCP tools whose descriptions come from their
    docstrings; a tool call over the MCP protocol (mcp's own client, streamable HTTP) classifies an image, and
    a bad file comes back as a tool error with the reason, not a crash."""
    import asyncio
    import base64

    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    def data_url(path):
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

    async def session(url):
        async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as s:
                await s.initialize()
                tools = (await s.list_tools()).tools
                good = await s.call_tool("predict", {"image": data_url(files["photo.png"])})
                compared = await s.call_tool("compare", {"image": data_url(files["photo.png"]), "k": 2})
                bad = await s.call_tool("predict", {"image": data_url(files["notes.txt"])})
                return tools, good, compared, bad

    with launched(build_app(lab), mcp_server=True) as url:
        tools, good, compared, bad = asyncio.run(session(url))
    by_name = {t.name: t for t in tools}
    assert {"predict", "predict_edge", "compare", "explain"} <= set(by_name)
    for name in ("predict", "predict_edge", "compare", "explain"):
        tool = by_name[name]
        assert len(tool.description) > 60, (name, tool.description)
        assert all(p.get("description") for p in tool.inputSchema["properties"].values()), (name, tool.inputSchema)
    assert "CIFAR-10" in by_name["predict"].description and "Returns" in by_name["predict"].description
    assert set(by_name["explain"].inputSchema["properties"]["models"]["items"]["enum"]) == set(MODELS)
    text = " ".join(c.text for c in good.content if c.type == "text")
    assert not good.isError and re.search("|".join(CLASSES), text) and "available" in text  # + the OOD field
    assert not compared.isError and "ensemble" in " ".join(c.text for c in compared.content if c.type == "text")
    assert bad.isError and "not an image" in " ".join(c.text for c in bad.content if c.type == "text")
