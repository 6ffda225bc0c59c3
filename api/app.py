"""The HTTP layer: FastAPI routes under /api/v1, /healthz, the Gradio demo mounted at /demo.

    python -m uvicorn api.app:create_app --factory --host 127.0.0.1 --port 8000

Environment: CIFAR_CHECKPOINTS (zoo folder, as for the demo), CIFAR_EXPORTS (int8 edge models,
default exports/), CIFAR_API_DEMO=0 to serve the API without mounting the demo. Admission control
(cifar_core/admission.py), one gate for predictions and one for explanations: CIFAR_API_{PREDICT,EXPLAIN}_WORKERS
(requests answered at once), _QUEUE (how many may wait beyond those), _WAIT_S (the longest wait); defaults in
GATES.
Every input error is a 4xx with {"detail": "<what to fix>"}; 503 {"detail"} with Retry-After means busy (retry);
any other 5xx is a bug on our side. Every model answer carries a Server-Timing header (its stages, in ms).
"""
from __future__ import annotations

import json
import logging
import os
import time

from fastapi import APIRouter, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response

from cifar_core import timing
from cifar_core.admission import Admission, Busy, Limits
from cifar_core.images import MAX_FILE_BYTES
from cifar_core.serving import MAX_BATCH

from .service import ApiService, ClientError, parse_target

VERSION = "1"
# The multipart framing around one file is a few hundred bytes; the image limit itself is
# checked again after reading (413 either way), so the body can never grow unbounded in memory.
MAX_BODY_BYTES = MAX_FILE_BYTES + 64 * 1024
FORM_LIMITS = {"max_files": 1, "max_fields": 8, "max_part_size": 1024}
UPLOAD = File(..., description=f"the image (PNG, JPEG, WebP, GIF, BMP, TIFF), at most "
                               f"{MAX_FILE_BYTES // 2**20} MB")
MODEL = Query("ensemble", description="'ensemble', a zoo member or an edge (int8) model; see GET /api/v1/models")
# A child of uvicorn's error logger: uvicorn's default logging config prints it (INFO), where a logger of our
# own would have no handler and its one-line notes on user errors would vanish.
log = logging.getLogger("uvicorn.error").getChild("api")


TOO_LARGE = f"the upload is larger than {MAX_FILE_BYTES // 2**20} MB (one image per request)"
NO_FILE = "send the image as multipart/form-data in a field named 'file'"


def describe_invalid(errors) -> str:
    """FastAPI's validation errors (a list of pydantic dicts) -> one sentence that says what to fix."""
    parts = []
    for e in errors:
        where, *path = e.get("loc") or ("request",)
        name = ".".join(map(str, path)) or where
        if where == "body":
            parts.append(NO_FILE)
            continue
        msg = e.get("msg", "is invalid")
        got = f" (got {e['input']!r})" if "input" in e and e.get("type") != "missing" else ""
        parts.append(f"{where} parameter {name!r}: {msg[:1].lower()}{msg[1:]}{got}")
    return "; ".join(dict.fromkeys(parts)) or "the request is invalid"


class JsonTooLarge:
    """Starlette's body limit answers an oversized upload with a plain-text 413 before any route or
    exception handler runs; the API promises {"detail": ...} for every input error, so this ASGI
    wrapper rewrites exactly that response (and nothing else) for /api/ paths."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        rewritten = False

        async def send_json(message):
            nonlocal rewritten
            if message["type"] == "http.response.start" and message["status"] == 413:
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(b"text/plain"):
                    rewritten = True
                    body = json.dumps({"detail": TOO_LARGE}).encode()
                    await send({**message, "headers": [(b"content-type", b"application/json"),
                                                       (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
            if rewritten and message["type"] == "http.response.body":
                return  # the plain-text body; ours is already sent
            await send(message)

        await self.app(scope, receive, send_json)


def read_upload(service: ApiService, file: UploadFile):
    data = file.file.read(MAX_FILE_BYTES + 1)
    return service.decode(data)


# Predictions of concurrent requests share forward passes (cifar_core/batching.py): up to MAX_BATCH run at once.
# Explanations are heavy and hold one model at a time: two at once keep both cores busy.
GATES = {"predict": Limits(workers=MAX_BATCH, waiting=32, wait_s=10.0),
         "explain": Limits(workers=2, waiting=8, wait_s=30.0)}


def limits_from_env(gate: str) -> Limits:
    """GATES[gate], with CIFAR_API_<GATE>_WORKERS / _QUEUE / _WAIT_S from the environment where set."""
    default, prefix = GATES[gate], f"CIFAR_API_{gate.upper()}_"
    env = os.environ
    try:
        return Limits(workers=int(env.get(prefix + "WORKERS", default.workers)),
                      waiting=int(env.get(prefix + "QUEUE", default.waiting)),
                      wait_s=float(env.get(prefix + "WAIT_S", default.wait_s)))
    except ValueError as e:
        raise SystemExit(f"bad admission setting ({prefix}WORKERS / {prefix}QUEUE / {prefix}WAIT_S): {e}")


def demo_queue(blocks) -> dict:
    """The mounted demo's queue: events waiting now (Gradio's own count, as its /gradio_api/queue/status
    reports it) and its limits (demo/app.py)."""
    queue = getattr(blocks, "_queue", None)
    if queue is None:
        return {"waiting": None}
    live = getattr(queue, "event_queue_per_concurrency_id", {})  # a lane's queue appears with its first event
    lanes: dict[str, dict] = {}
    for fn in getattr(blocks, "fns", {}).values():
        limit = queue.default_concurrency_limit if fn.concurrency_limit == "default" else fn.concurrency_limit
        lane = lanes.setdefault(fn.concurrency_id, {"workers": limit})
        if limit is not None:  # as Gradio does: the lowest limit of a lane's events wins; None is unlimited
            lane["workers"] = limit if lane["workers"] is None else min(lane["workers"], limit)
    for name, lane in lanes.items():
        q = live.get(name)
        lane.update(waiting=len(q.queue) if q else 0, running=q.current_concurrency if q else 0)
    return {"waiting": len(queue), "max_waiting": queue.max_size, "lanes": lanes}


def json_response(content: dict) -> Response:
    """The answer as JSON bytes, serialized here, so that serialization is a timed stage like the others."""
    with timing.stage("serialize"):
        return Response(json.dumps(content).encode(), media_type="application/json")


def build_router(service: ApiService, gates: dict[str, Admission]) -> APIRouter:
    router = APIRouter(prefix=f"/api/v{VERSION}", max_body_size=MAX_BODY_BYTES, form_limits=FORM_LIMITS)

    @router.get("/models", summary="Zoo members, edge models and the ensemble, with versions")
    def models() -> dict:
        return service.models()

    # Plain `def` endpoints: FastAPI runs them in its thread pool, so CPU-bound inference does
    # not block the event loop; `gate` bounds how many run and wait (503 beyond); each Predictor
    # serializes its own model with a lock.
    @router.post("/predict", summary="Classify one image: per-model and ensemble probabilities, top-k",
                 responses={200: {"description": "prediction, top-k, per-member results, OOD check, latency"},
                            503: {"description": "busy: too many requests at once; retry after Retry-After s"}})
    def predict(file: UploadFile = UPLOAD, model: str = MODEL,
                top_k: int = Query(3, ge=1, le=10, description="how many classes to rank")) -> Response:
        with timing.record("rest:predict") as stages, gates["predict"].admit():
            t0 = time.perf_counter()
            image = read_upload(service, file)
            t1 = time.perf_counter()
            result = service.predict(image, model, top_k)
            t2 = time.perf_counter()
            result["latency_ms"] = {"decode": round(1000 * (t1 - t0), 3), "inference": round(1000 * (t2 - t1), 3),
                                    "total": round(1000 * (t2 - t0), 3)}
            response = json_response(result)
        response.headers["Server-Timing"] = timing.server_timing(stages)
        return response

    @router.post("/explain", summary="Grad-CAM overlay of one image as PNG",
                 responses={200: {"content": {"image/png": {}}, "description": "the overlay"}},
                 response_class=Response)
    def explain(file: UploadFile = UPLOAD,
                model: str = Query("ensemble", description="'ensemble' or a zoo member (edge models have no CAM)"),
                method: str = Query("gradcam", description="gradcam, gradcam++, hirescam, layercam, eigencam, scorecam"),
                target: str | None = Query(None, description="class name or index; default: the prediction"),
                alpha: float = Query(0.5, ge=0.0, le=1.0, description="opacity of the heat map"),
                size: int = Query(256, ge=32, le=1024, description="side of the PNG in pixels")) -> Response:
        with timing.record("rest:explain") as stages, gates["explain"].admit():
            image = read_upload(service, file)
            png, chosen = service.explain_png(image, model, method, parse_target(target), alpha, size)
        from cifar_core.data import CLASSES
        return Response(png, media_type="image/png", headers={"X-Model": model, "X-Target": CLASSES[chosen],
                                                              "Server-Timing": timing.server_timing(stages)})

    @router.get("/stats", summary="Where recent requests' time went: p50/p95 per stage, per endpoint")
    def stats(clear: bool = Query(False, description="empty the log after reading it")) -> dict:
        return {"sources": timing.summary(timing.recent(clear=clear)), "batching": service.lab.batching,
                "note": "milliseconds over the last <= 2048 answered requests (REST and demo) in this process; "
                        "'total' is the time inside our code; the rest of a client's wait is the framework's"}

    return router


def create_app(service: ApiService | None = None, demo: bool | None = None) -> FastAPI:
    """The ASGI app (uvicorn's --factory calls this with no arguments)."""
    service = service or ApiService.load()
    demo = os.environ.get("CIFAR_API_DEMO", "1") != "0" if demo is None else demo
    gates = {name: Admission(limits_from_env(name)) for name in GATES}
    app = FastAPI(title="CIFAR-10 lab API", version=VERSION,
                  description="Classify CIFAR-10 classes and explain the decision. The demo UI is at /demo.")
    app.include_router(build_router(service, gates))
    mounted = {}  # the demo's Blocks once mounted: /healthz reads its queue

    @app.exception_handler(Busy)
    def busy(request: Request, exc: Busy) -> JSONResponse:
        log.info("%s %s -> 503: %s", request.method, request.url.path, exc.message)
        return JSONResponse({"detail": exc.message}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after_s)})

    # Expected user errors log one line; anything else is a bug and keeps uvicorn's traceback.
    @app.exception_handler(ClientError)
    def client_error(request: Request, exc: ClientError) -> JSONResponse:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = describe_invalid(exc.errors())
        content_type = request.headers.get("content-type", "")
        # a body that is not a form at all (JSON, raw bytes) is the wrong media type, not a missing field
        status = 415 if request.method == "POST" and content_type and \
            not content_type.startswith("multipart/form-data") else 422
        log.info("%s %s -> %d: %s", request.method, request.url.path, status, detail)
        return JSONResponse({"detail": detail}, status_code=status)

    # async: answered on the event loop, even while every worker thread is busy with models
    @app.get("/healthz", summary="Liveness, what is loaded, and how many requests are running and waiting")
    async def healthz() -> dict:
        queue = {f"rest_{name}": gate.depth() for name, gate in gates.items()}
        if "blocks" in mounted:
            queue["demo"] = demo_queue(mounted["blocks"])
        return {"status": "ok", "models": service.lab.names, "edge_models": list(service.edge), "demo": demo,
                "queue": queue}

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/demo/" if demo else "/docs")

    if demo:
        import gradio as gr
        from demo.app import build_app, launch_kwargs
        blocks = mounted["blocks"] = build_app(service.lab)
        app = gr.mount_gradio_app(app, blocks, path="/demo", **launch_kwargs())  # as `python -m demo` serves it
    log.info("API ready: models %s, edge %s, demo %s", service.lab.names, list(service.edge), demo)
    app.add_middleware(JsonTooLarge)
    return app
