"""The HTTP service: a FastAPI app over one predictor, torch or ONNX (``visualad serve``; the ``serve`` extra).

- the Open Inference Protocol v2 as Triton's and KServe's clients call it (:mod:`visualad.serve.oip`):
  ``GET /v2``, ``/v2/health/live|ready``, ``/v2/models/{name}[/versions/1][/ready]``, ``POST
  /v2/models/{name}[/versions/1]/infer`` in JSON (base64 images) or with the binary tensor data extension;
- ``POST /predict``: multipart ``file`` parts -> ``{"results": [...]}`` (``?overlay=png`` adds each picture as
  base64 PNG), ``POST /calibrate`` and ``POST /references`` from normal images;
- ``GET /``: the inspection page (no CDN: its script is served from here).

Images of concurrent requests share forwards (:mod:`visualad.serve.batcher`); batch mode only ever scores the
images of one request against each other. With a token, every route but the page and the health checks needs
``Authorization: Bearer <token>`` (the page asks for it). Hosts, origins and the answers' headers:
:mod:`visualad.serve.guard`; bytes, images and pixels per request: :mod:`visualad.serve.limits`.
"""
from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import threading
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import images as imio
from ..data.images import image_digest
from ..errors import ConfigError, ImageTooLargeError, VisualADError
from ..operating import SELF_CALIBRATED
from ..predictor import ONE_REFERENCE, Predictor
from ..runtime.postprocess import operating_point
from ..runtime.readahead import load_one
from . import guard, oip
from .batcher import Batcher
from .errors import RequestError
from .limits import PixelBudget, read_body, read_uploads

#: the protocol's model versions: one model, one version
VERSIONS = ["1"]

logger = logging.getLogger(__name__)


#: /calibrate sets a threshold from the scores of this many normal images at least (one image's score is no
#: threshold); below WARN_CALIBRATION_IMAGES the answer carries a warning the page shows
MIN_CALIBRATION_IMAGES, WARN_CALIBRATION_IMAGES = 5, 20


def _warn(answer: Dict[str, Any], images: int, own_references: bool) -> None:
    """Add the ``warning`` the page shows when a threshold rests on few images or on the references' own scores."""
    warnings = []
    if images < WARN_CALIBRATION_IMAGES:
        warnings.append(f"calibrated on only {images} normal images; {WARN_CALIBRATION_IMAGES} or more give a "
                        "steadier threshold")
    if own_references:  # leave-one-out scores each against one reference fewer than new parts get
        warnings.append("these images are the references: each was scored against the others only, with one "
                        "reference fewer than a new part gets, so the threshold errs high (more defects "
                        "missed); calibrate on other good parts when you can")
    if warnings:
        answer["warning"] = "; ".join(warnings)


def create_app(detector: Predictor, model_name: str = "visualad", token: Optional[str] = None, max_batch_size: int = 8,
               max_latency_ms: float = 10.0, max_upload_mb: float = 20.0, max_images: int = 64,
               max_decode_mp: float = 64.0, allowed_hosts: Sequence[str] = ()) -> Any:
    """The FastAPI app of ``detector`` (an :class:`~visualad.AnomalyDetector` or an
    :class:`~visualad.onnx.OnnxDetector`). ``max_decode_mp``: megapixels decoded or held at once across all
    requests; ``allowed_hosts``: host names served besides IP addresses and localhost (a proxy's)."""
    for name, value in (("max_upload_mb", max_upload_mb), ("max_decode_mp", max_decode_mp)):
        if not (math.isfinite(value) and value > 0):  # a NaN bound would compare false: no bound at all
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(max_latency_ms) and max_latency_ms >= 0):
        raise ConfigError(f"max_latency_ms must be a number >= 0, got {max_latency_ms!r}")
    if int(max_images) < 1 or int(max_batch_size) < 1:
        raise ConfigError(f"max_images and max_batch_size must be >= 1, got {max_images!r} and {max_batch_size!r}")
    limit = int(max_upload_mb * 2**20)
    hosts = frozenset(h.lower() for h in allowed_hosts)
    backend = detector.backend
    batcher = Batcher(backend, max_batch_size, max_latency_ms)
    budget = PixelBudget(int(max_decode_mp * 1e6))
    settings_lock = threading.Lock()  # references and thresholds change under it
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        batcher.close()  # after uvicorn has finished the requests in flight

    app = FastAPI(title="visualad", version=_version(), lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def guarded(request: Request, call_next: Any) -> Any:
        refusal = guard.refusal(request.headers, request.method, request.url.path, request.url.scheme, token,
                                hosts)
        length = request.headers.get("content-length")
        if refusal is None and length is not None and length.isdigit() and int(length) > limit:
            refusal = 413, (f"upload of {int(length)} bytes is over the limit of {limit} bytes "
                            f"(--max-upload-mb {max_upload_mb:g})")
        response = _error(*refusal) if refusal is not None else await call_next(request)
        response.headers.update(guard.SECURITY_HEADERS)
        return response

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> Any:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        """Every error in the protocol's form, {"error": ...} (unknown routes and methods too)."""
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        """A bug, not the client's fault: logged with its traceback, answered in one line."""
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    def opened(files: List[Tuple[str, bytes]]) -> List[Tuple[str, Any]]:
        """Each upload's header read and its size checked: no pixel is decoded yet."""
        out = []
        for name, data in files:
            try:
                out.append((name, imio.open_encoded(data, name)))
            except ImageTooLargeError as exc:
                raise RequestError(413, str(exc)) from None
            except VisualADError as exc:
                raise RequestError(422, str(exc)) from None
        return out

    @contextlib.contextmanager
    def decoded(files: List[Tuple[str, bytes]], keep_image: bool) -> Any:
        """The uploads decoded and resized, their pixels held in the server's budget until the block ends."""
        images = opened(files)
        with budget.hold(sum(pil.size[0] * pil.size[1] for _, pil in images)):
            loaded = []
            for i, (name, pil) in enumerate(images):
                x = load_one(i, pil, backend.image_size, keep_image, label=name)
                if not x.ok:
                    raise RequestError(422, f"{name}: {getattr(x.error, 'reason', x.error)}")
                x.path = name
                loaded.append(x)
            yield loaded

    def score(files: List[Tuple[str, bytes]], mode: str, overlay: bool = False) -> List[Dict[str, Any]]:
        with decoded(files, keep_image=overlay) as loaded:
            try:
                with settings_lock:
                    scorer = detector.scoring_mode(mode, len(loaded))
                maps, scores = batcher.score([x.square for x in loaded], scorer)
            except ConfigError as exc:
                raise RequestError(400, str(exc)) from None
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
        calibrated = cfg.image_threshold is not None
        stats = (cfg.score_stats or {}) if calibrated else {}
        return {"name": model_name, "platform": backend.platform, "versions": VERSIONS, "visualad": _version(),
                "backbone": cfg.backbone, "image_size": cfg.image_size, "head_trained": cfg.head_trained,
                "references": 0 if refs is None else refs.shots, "device": backend.device_name,
                "dtype": backend.dtype_name, "image_threshold": cfg.image_threshold,
                "pixel_threshold": cfg.pixel_threshold,
                "calibrated_mode": stats.get("mode"),
                # what the threshold means, and the calibration's normal scores: the page's slider shows the
                # false-alarm rate of any position from them
                "operating_point": operating_point(stats) if calibrated else None,
                "normal_scores": stats.get("normal_scores"),
                "max_batch_size": batcher.max_batch_size, "max_upload_mb": max_upload_mb,
                "max_decode_mp": max_decode_mp, "min_calibration_images": MIN_CALIBRATION_IMAGES,
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "max_images": max_images,
                "outputs": [{"name": name, "datatype": dtype, "shape": [-1]} for name, dtype in oip.OUTPUTS.items()]}

    def check_name(name: str, version: Optional[str] = None) -> None:
        if name != model_name:
            raise RequestError(404, f"no model {name!r}; this server serves {model_name!r}")
        if version is not None and version not in VERSIONS:
            raise RequestError(404, f"model {name!r} has no version {version!r}; it has {VERSIONS}")

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

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: Optional[str] = None) -> Any:
        check_name(name, version)
        req = oip.parse_infer(await read_body(request, limit), request.headers.get(oip.HEADER), max_images)
        mode, overlay = req.parameters.get("mode", "auto"), req.parameters.get("overlay")
        if not isinstance(mode, str) or overlay not in (None, "png"):
            raise RequestError(400, "parameters.mode must be a mode name and parameters.overlay 'png' or absent")
        files = [(f"image{i}", data) for i, data in enumerate(req.images)]
        rows = await run_in_threadpool(score, files, mode, overlay == "png")  # the loop keeps taking requests
        outputs: Dict[str, Any] = {"score": [r["score"] for r in rows]}
        calibrated = all(r["label"] is not None for r in rows)
        if not calibrated and req.outputs is not None and "label" in req.outputs:
            raise RequestError(400, f"no label: the model has no threshold for {rows[0]['mode']} mode; calibrate "
                                    "it (POST /calibrate) or ask for the score only")
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
            raise RequestError(400, "overlay must be 'png'")
        files = await read_uploads(request, limit, max_images)
        return {"results": await run_in_threadpool(score, files, mode, overlay == "png")}

    @app.post("/references")
    async def references(request: Request, calibrate: bool = True) -> Any:
        """Normal images become the references; unless ``calibrate=false`` or the model already holds thresholds
        for them, they set their own (leave-one-out, as ``visualad predict --references`` does)."""
        files = await read_uploads(request, limit, max_images)

        def build() -> Dict[str, Any]:
            with decoded(files, keep_image=False) as loaded, settings_lock:
                detector.set_references([x.square for x in loaded], calibrate=calibrate)
                answer: Dict[str, Any] = {"references": detector.references.shots}
                if calibrate and detector.references.shots < 2 and not detector.has_thresholds("references"):
                    answer["warning"] = ONE_REFERENCE
                elif detector.has_thresholds("references"):
                    cfg = detector.config
                    stats = cfg.score_stats or {}
                    answer.update(image_threshold=cfg.image_threshold, pixel_threshold=cfg.pixel_threshold,
                                  operating_point=operating_point(stats))
                    point = stats.get("operating_point")  # a model directory's, when its thresholds held
                    if isinstance(point, dict) and point.get("calibrated_on") == SELF_CALIBRATED \
                            and isinstance(point.get("n_normal"), int):
                        _warn(answer, point["n_normal"], own_references=True)
                return answer

        try:
            return await run_in_threadpool(build)
        except VisualADError as exc:
            raise RequestError(400, str(exc)) from None

    @app.post("/calibrate")
    async def calibrate(request: Request, mode: str = "auto") -> Any:
        files = await read_uploads(request, limit, max_images)
        if len(files) < MIN_CALIBRATION_IMAGES:
            raise RequestError(400, f"calibration needs at least {MIN_CALIBRATION_IMAGES} normal images, got "
                                    f"{len(files)}: the threshold of fewer is little more than one image's score")

        def run() -> Tuple[Dict[str, Any], bool]:
            with decoded(files, keep_image=False) as loaded, settings_lock:
                squares = [x.square for x in loaded]
                detector.calibrate(squares, mode=mode, progress=False)
                cfg, refs = detector.config, detector.references
                stats = cfg.score_stats or {}
                own = (refs is not None and stats.get("mode") == "references"
                       and bool({image_digest(s) for s in squares} & set(refs.digests)))
                return {"image_threshold": cfg.image_threshold, "pixel_threshold": cfg.pixel_threshold,
                        "mode": stats.get("mode"), "images": len(loaded),
                        "operating_point": operating_point(stats)}, own

        try:
            answer, own_references = await run_in_threadpool(run)
        except VisualADError as exc:
            raise RequestError(400, str(exc)) from None
        _warn(answer, answer["images"], own_references)
        return answer

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _asset("index.html")

    @app.get("/page.js")
    def script() -> Response:
        return Response(_asset("page.js"), media_type="text/javascript")

    @app.get("/page.css")
    def style() -> Response:
        return Response(_asset("page.css"), media_type="text/css")

    return app


def _error(status: int, message: str) -> JSONResponse:
    """``{"error": message}``; a 413 also closes the connection, so that the rest of the body is never read."""
    headers = {"connection": "close"} if status == 413 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _asset(name: str) -> str:
    return resources.files("visualad.serve").joinpath("static", name).read_text(encoding="utf-8")


def _version() -> str:
    from .._version import __version__

    return __version__
