"""The HTTP service: a FastAPI app over one predictor, torch or ONNX (``visualad serve``; the ``serve`` extra).

- the Open Inference Protocol v2 as Triton's and KServe's clients call it (:mod:`visualad.serve.oip`):
  ``GET /v2``, ``/v2/health/live|ready``, ``/v2/models/{name}[/versions/1][/ready]``, ``POST
  /v2/models/{name}[/versions/1]/infer`` in JSON (base64 images) or with the binary tensor data extension;
- ``POST /predict``: multipart ``file`` parts -> ``{"results": [...]}`` (``?overlay=png`` adds each picture as
  base64 PNG), ``POST /calibrate`` and ``POST /references`` from normal images;
- ``GET /``: the inspection page (no CDN: its script is served from here).

Images of concurrent requests share forwards (:mod:`visualad.serve.batcher`); batch mode only ever scores the
images of one request against each other. With a token, every route but the health checks needs
``Authorization: Bearer <token>``.
"""
from __future__ import annotations

import base64
import contextlib
import io
import logging
import threading
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, VisualADError
from ..predictor import Predictor
from ..runtime.readahead import Loaded, load_one
from . import oip
from .batcher import Batcher

#: the protocol's model versions: one model, one version
VERSIONS = ["1"]

logger = logging.getLogger(__name__)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(detector: Predictor, model_name: str = "visualad", token: Optional[str] = None, max_batch_size: int = 8,
               max_latency_ms: float = 10.0, max_upload_mb: float = 20.0, max_images: int = 64) -> Any:
    """The FastAPI app of ``detector`` (an :class:`~visualad.AnomalyDetector` or an
    :class:`~visualad.onnx.OnnxDetector`)."""
    limit = int(max_upload_mb * 2**20)
    backend = detector.backend
    batcher = Batcher(backend, max_batch_size, max_latency_ms)
    settings_lock = threading.Lock()  # references and thresholds change under it
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        batcher.close()  # after uvicorn has finished the requests in flight

    app = FastAPI(title="visualad", version=_version(), lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if token is not None and not request.url.path.startswith("/v2/health"):
            if request.headers.get("authorization") != f"Bearer {token}":
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"error": f"upload of {int(length)} bytes is over the limit of {limit} bytes "
                                          f"(--max-upload-mb {max_upload_mb:g})"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(_BadRequest)
    async def bad_request(request: Request, exc: _BadRequest) -> Any:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        """Every error in the protocol's form, {"error": ...} (unknown routes and methods too)."""
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    async def read_files(request: Request) -> List[Tuple[str, bytes]]:
        body = await request.body()
        if len(body) > limit:
            raise _BadRequest(413, f"upload of {len(body)} bytes is over the limit of {limit} bytes")
        form = await request.form()
        files = [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(form.getlist("file"))]
        if not files:
            raise _BadRequest(400, "no 'file' parts in the request (multipart/form-data)")
        if len(files) > max_images:
            raise _BadRequest(413, f"{len(files)} images in one request is over the limit of {max_images}")
        return files

    def decode(files: List[Tuple[str, bytes]], keep_image: bool) -> List[Loaded]:
        from PIL import Image

        loaded = []
        for i, (name, data) in enumerate(files):
            try:
                pil = Image.open(io.BytesIO(data))
            except Exception:  # noqa: BLE001 - any decoder failure is the client's bad file
                raise _BadRequest(422, f"{name}: not an image, or a format Pillow cannot read") from None
            x = load_one(i, pil, backend.image_size, keep_image, label=name)
            if not x.ok:
                raise _BadRequest(422, f"{name}: {x.error.reason if hasattr(x.error, 'reason') else x.error}")
            x.path = name
            loaded.append(x)
        return loaded

    def score(files: List[Tuple[str, bytes]], mode: str, overlay: bool = False) -> List[Dict[str, Any]]:
        loaded = decode(files, keep_image=overlay)
        try:
            with settings_lock:
                scorer = detector.scoring_mode(mode, len(loaded))
            maps, scores = batcher.score([x.square for x in loaded], scorer)
        except ConfigError as exc:
            raise _BadRequest(400, str(exc)) from None
        out = []
        scored = ((x, m, float(s)) for x, m, s in zip(loaded, maps, scores))
        for x, res in zip(loaded, detector.results(scored, scorer)):
            res.image_path = x.path
            row = res.to_row()
            if overlay and res.ok:
                buf = io.BytesIO()
                res.overlay().save(buf, format="PNG")
                row["overlay_png"] = base64.b64encode(buf.getvalue()).decode()
            out.append(row)
        return out

    def metadata() -> Dict[str, Any]:
        cfg = detector.config
        refs = detector.references
        return {"name": model_name, "platform": backend.platform, "versions": VERSIONS, "visualad": _version(),
                "backbone": cfg.backbone, "image_size": cfg.image_size, "head_trained": cfg.head_trained,
                "references": 0 if refs is None else refs.shots, "device": backend.device_name,
                "dtype": backend.dtype_name, "image_threshold": cfg.image_threshold,
                "pixel_threshold": cfg.pixel_threshold,
                "calibrated_mode": (cfg.score_stats or {}).get("mode") if cfg.image_threshold is not None else None,
                "max_batch_size": batcher.max_batch_size, "max_upload_mb": max_upload_mb,
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "max_images": max_images,
                "outputs": [{"name": name, "datatype": dtype, "shape": [-1]} for name, dtype in oip.OUTPUTS.items()]}

    def check_name(name: str, version: Optional[str] = None) -> None:
        if name != model_name:
            raise _BadRequest(404, f"no model {name!r}; this server serves {model_name!r}")
        if version is not None and version not in VERSIONS:
            raise _BadRequest(404, f"model {name!r} has no version {version!r}; it has {VERSIONS}")

    @app.get("/v2")
    def server_metadata() -> Dict[str, Any]:
        return {"name": "visualad", "version": _version(), "extensions": oip.EXTENSIONS}

    @app.get("/v2/health/live")
    def live() -> Dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> Any:
        return {"ready": True}

    @app.get("/v2/models")
    def models() -> Dict[str, Any]:
        return {"models": [model_name]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    def model(name: str, version: Optional[str] = None) -> Dict[str, Any]:
        check_name(name, version)
        return metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    def model_ready(name: str, version: Optional[str] = None) -> Dict[str, Any]:
        check_name(name, version)
        return {"name": model_name, "ready": True}

    async def bounded_body(request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit while it streams."""
        parts, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise _BadRequest(413, f"upload over the limit of {limit} bytes (--max-upload-mb {max_upload_mb:g})")
            parts.append(chunk)
        return b"".join(parts)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: Optional[str] = None) -> Any:
        check_name(name, version)
        try:
            req = oip.parse_infer(await bounded_body(request), request.headers.get(oip.HEADER), max_images)
        except oip.ProtocolError as exc:
            raise _BadRequest(exc.status, exc.message) from None
        mode, overlay = req.parameters.get("mode", "auto"), req.parameters.get("overlay")
        if not isinstance(mode, str) or overlay not in (None, "png"):
            raise _BadRequest(400, "parameters.mode must be a mode name and parameters.overlay 'png' or absent")
        files = [(f"image{i}", data) for i, data in enumerate(req.images)]
        rows = await run_in_threadpool(score, files, mode, overlay == "png")  # the loop keeps taking requests
        outputs: Dict[str, Any] = {"score": [r["score"] for r in rows]}
        calibrated = all(r["label"] is not None for r in rows)
        if calibrated:
            outputs["label"] = [r["label"] for r in rows]
        if overlay == "png":
            outputs["overlay"] = [base64.b64decode(r["overlay_png"]) for r in rows]
        body, headers = oip.encode_response(req, model_name, outputs,
                                            {"mode": rows[0]["mode"], "calibrated": calibrated})
        return Response(body, headers=headers)

    @app.post("/predict")
    async def predict(request: Request, mode: str = "auto", overlay: Optional[str] = None) -> Any:
        if overlay not in (None, "png"):
            raise _BadRequest(400, "overlay must be 'png'")
        files = await read_files(request)
        return {"results": await run_in_threadpool(score, files, mode, overlay == "png")}

    @app.post("/references")
    async def references(request: Request) -> Any:
        loaded = decode(await read_files(request), keep_image=False)

        def build() -> None:
            with settings_lock:
                detector.set_references([x.square for x in loaded])

        await run_in_threadpool(build)
        return {"references": detector.references.shots}

    @app.post("/calibrate")
    async def calibrate(request: Request, mode: str = "auto") -> Any:
        loaded = decode(await read_files(request), keep_image=False)

        def run() -> None:
            with settings_lock:
                detector.calibrate([x.square for x in loaded], mode=mode, progress=False)

        try:
            await run_in_threadpool(run)
        except VisualADError as exc:
            raise _BadRequest(400, str(exc)) from None
        return {"image_threshold": detector.config.image_threshold,
                "pixel_threshold": detector.config.pixel_threshold,
                "mode": (detector.config.score_stats or {}).get("mode"), "images": len(loaded)}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _asset("index.html")

    @app.get("/page.js")
    def script() -> Response:
        return Response(_asset("page.js"), media_type="text/javascript")

    return app


def _asset(name: str) -> str:
    return resources.files("visualad.serve").joinpath("static", name).read_text(encoding="utf-8")


def _version() -> str:
    from .._version import __version__

    return __version__
