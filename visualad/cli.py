"""The ``visualad`` command: a thin layer over the Python API. Only this module prints."""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence

from ._version import __version__
from .errors import VisualADError
from .modes import MODES  # the package's __init__ holds only the names: no torch
from .modes.base import NO_THRESHOLD
from .modes.choice import uses_references

EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 2


def _add_model_args(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    p.add_argument("--model", default=default,
                   help="model alias, local directory or org/repo[@revision] (default: the offline default model)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision (default: bf16 on CUDA and on CPUs with native bf16, else fp32)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input size (px)")




def _runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"],
                   help="what runs an ONNX export given as --model (openvino: the openvino extra; "
                        "default: onnxruntime)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _mode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="way of scoring: head (the trained tokens), references (nearest patches of normal "
                        "images), batch (the images given together scored against each other: it assumes that "
                        "defects are local and on a minority of them); auto (default): references when given, "
                        "else batch for 16+ images, else head")
    p.add_argument("--compare-with", type=_positive_int, default=64, metavar="N",
                   help="batch mode: each image is compared with at most N others (default: 64)")


def _number(low: float = -math.inf, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number, at least ``low`` (more than ``low`` with ``above``). NaN compares
    false with every limit, so unchecked it would turn a bound off."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            bound = "" if low == -math.inf else f" {'>' if above else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {value}")
        return value

    return number


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def _picture_args(p: argparse.ArgumentParser, style: str = "overlay") -> None:
    p.add_argument("--overlay-style", default=style, choices=["overlay", "panel"],
                   help="overlay: the heat map over the image with a legend; panel: image | heat map with the "
                        f"predicted region | ground truth (eval) side by side (default: {style})")
    p.add_argument("--cmap", default="jet", choices=["jet", "turbo", "inferno", "viridis", "magma", "hot"],
                   help="colour map of the heat map (default: jet)")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="heat-map opacity in [0, 1] (default: 0.5)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visualad",
        description="Zero-shot anomaly detection on images (VisualAD, CVPR 2026).",
        epilog="Run 'visualad COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"visualad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("predict", help="score images; write one JSON line per input and optional overlays",
                       description="Score image files, folders (recursive) and globs. Writes one JSON object per "
                                   "input (path, score, label, threshold, error). An unreadable input gets an "
                                   "'error' and the run goes on; the exit code is 2 if any input failed.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    _add_model_args(p)
    _runtime_arg(p)
    p.add_argument("--out", type=Path, default=None,
                   help="rows to this file: JSON lines, or CSV when it ends in .csv (default: JSON lines on "
                        "standard output)")
    p.add_argument("--overlays", type=Path, default=None,
                   help="folder for heat-map overlays (PNG, original size; mirrors the input folders)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--threshold", type=_number(), default=None, help="image threshold overriding the calibrated one")
    p.add_argument("--references", type=Path, default=None,
                   help="folder of normal reference images of the same product (references mode); without "
                        "--threshold and with no calibration for them, they set their own (leave-one-out)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier, killed run with the same --out (inputs unchanged since) and "
                        "score only the rest")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="ray: score on a Ray cluster (the ray extra; a local Ray when --ray-address is not given; "
                        "default: local)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="the Ray cluster to use (ray://... or auto)")
    p.add_argument("--save-maps", type=Path, default=None, metavar="DIR",
                   help="keep each raw map at the image's size (and the predicted mask, <name>.mask.png, when a "
                        "pixel threshold exists); rows gain map_path and mask_path")
    p.add_argument("--map-format", default="npy", choices=["npy", "png16"],
                   help="npy: float32 (default); png16: 16-bit PNG scaled to the row's map_range")
    _mode_args(p)
    _picture_args(p)
    _common(p)

    p = sub.add_parser("eval", help="evaluate on a labelled dataset; per-class and mean metrics",
                       description="Evaluate on an MVTec-style tree, VisA split_csv, meta.json or plain folder. "
                                   "Maps are scored at the model's input size (the papers' protocol) unless "
                                   "--at-original-resolution.")
    p.add_argument("root", type=Path, metavar="DATASET_ROOT")
    _add_model_args(p)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--format", default="auto", choices=["auto", "mvtec", "visa", "meta", "folder"],
                   help="the dataset's layout (default: auto, found from its files)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--at-original-resolution", action="store_true",
                   help="score maps at each image's own size instead of the model's input size")
    p.add_argument("--aupro-variant", default="mvtec", choices=["mvtec", "zsad"],
                   help="mvtec: the MVTec definition (default); zsad: the papers' 200-threshold variant")
    p.add_argument("--shots", type=int, default=0,
                   help="references mode: K normal reference images per category from its train/good (fixed seed)")
    p.add_argument("--overlays", type=Path, default=None, metavar="DIR",
                   help="a picture per test image under DIR/<category>/<defect>/ (with the ground truth)")
    _mode_args(p)
    _picture_args(p, style="panel")
    _common(p)

    p = sub.add_parser("finetune", help="train the tokens, SCA and SAF on an auxiliary dataset",
                       description="Train on an auxiliary set (any layout of 'eval'); the backbone stays frozen. "
                                   "Writes a model directory loadable with --model DIR.")
    p.add_argument("root", type=Path, metavar="AUX_ROOT")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--model", default=None,
                   help="the model to continue from: alias, model directory or org/repo[@revision] (default: the "
                        "offline default model, dinov2-s-imgfocus, with its trained head, as "
                        "AnomalyDetector.from_pretrained().finetune() starts)")
    p.add_argument("--fresh-head", action="store_true",
                   help="start from a fresh, untrained head on the model's backbone instead (seeded by --seed)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="training and prediction size in px (default: the base model's; 224 for "
                        "dinov2-s-imgfocus, whose cost grows with (size / 14)^2: 448 px is about 4x slower)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="the global batch (under torchrun it is split over the processes)")
    p.add_argument("--lr", type=_number(0), default=None, help="learning rate of the tokens (others scale with it)")
    p.add_argument("--seed", type=int, default=111, help="seed of the run (default: 111, the authors')")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--synthesize", choices=["auto", "always", "never"], default="auto",
                   help="synthetic anomalies on normal images (default: auto, only when the set has no anomalies)")
    p.add_argument("--include-train-normals", action="store_true",
                   help="also train on the train split's normal images when the test split has anomalies (they are "
                        "used anyway when it has none or is missing)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    _common(p)

    p = sub.add_parser("calibrate", help="set thresholds from normal images; writes a model directory",
                       description="Score normal images (and optionally anomalous ones) and store image and pixel "
                                   "thresholds in a new model directory.")
    p.add_argument("normal_dir", type=Path, metavar="NORMAL_DIR")
    _add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--anomalous", type=Path, default=None, help="folder of anomalous images (enables F1 mode)")
    p.add_argument("--percentile", type=float, default=None, help="percentile of normal scores (default 99.5)")
    p.add_argument("--false-alarm-rate", type=float, default=None, metavar="R",
                   help="the threshold that flags a fraction R of normal parts (e.g. 0.01), from out-of-sample normal "
                        "scores; the run states the expected rate and a 95%% upper bound on it (default: none, the "
                        "percentile)")
    p.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="with --anomalous: the highest threshold that flags a share R of them (default: none)")
    p.add_argument("--operating-point", default=None, choices=["false_alarm", "percentile", "f1", "recall"],
                   help="which threshold to keep when several are computed (default: false_alarm with "
                        "--false-alarm-rate, recall with --target-recall, f1 with --anomalous, else percentile)")
    p.add_argument("--references", type=Path, default=None,
                   help="also store these normal reference images in the model (references mode)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    _mode_args(p)
    _common(p)

    p = sub.add_parser("convert-official", help="convert the authors' .pth checkpoint into a model directory",
                       description="Reads the authors' checkpoint with torch.load(weights_only=True) (the only place "
                                   "visualad reads a pickle) and writes config.json + model.safetensors.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT.pth")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbone", default="clip-l", help="the checkpoint's backbone (default: clip-l)")
    p.add_argument("--backbone-weights", type=Path, default=None,
                   help="local safetensors of the backbone in its library's naming (makes the directory offline)")
    p.add_argument("--load-final-norm", action="store_true",
                   help="use the checkpoint's trained ln_post (the authors' test script does not)")
    _common(p)

    p = sub.add_parser("export", help="export a model to ONNX, to run with onnxruntime and no torch",
                       description="Writes head.onnx, features.onnx, grid_to_map.onnx, the config (thresholds, "
                                   "mode, preprocessing) and the references; `visualad predict --model DIR` and "
                                   "visualad.onnx.OnnxDetector(DIR) run it.")
    p.add_argument("--model", default=None, help="model alias, local directory or org/repo[@revision] (default: "
                                                 "the offline default model)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--image-size", type=_positive_int, default=None, help="the graphs' input size (px)")
    p.add_argument("--references", type=Path, default=None, help="normal images to export as the references")
    _common(p)

    p = sub.add_parser("serve", help="an HTTP service and an inspection page (needs the serve extra)",
                       description="Serves POST /predict, /calibrate, /references, the Open Inference Protocol v2 "
                                   "routes under /v2 and an inspection page at /. Concurrent requests share "
                                   "forwards; SIGTERM finishes the requests in flight and exits 0.")
    _add_model_args(p)
    _runtime_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name to serve besides IP addresses and localhost, e.g. a proxy's (repeatable; "
                        "default: none, so that a rebound DNS name cannot reach the server)")
    p.add_argument("--max-batch-size", type=_positive_int, default=8, help="images per forward (default: 8)")
    p.add_argument("--max-latency-ms", type=_number(0), default=10.0,
                   help="how long a request may wait for others to share its forward (default: 10)")
    p.add_argument("--max-upload-mb", type=_number(0, above=True), default=20.0,
                   help="larger requests get 413 (default: 20)")
    p.add_argument("--max-images", type=_positive_int, default=64,
                   help="images in one request; more get 413 (default: 64)")
    p.add_argument("--max-decode-mp", type=_number(0, above=True), default=64.0, metavar="MP",
                   help="megapixels decoded at once across all requests; a request over it gets 413, others wait "
                        "(default: 64)")
    p.add_argument("--token", default=os.environ.get("VISUALAD_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' (default: $VISUALAD_TOKEN; none)")
    p.add_argument("--references", type=Path, default=None,
                   help="normal images to start in references mode (they set their own threshold, leave-one-out, "
                        "unless the model holds one for them)")
    _common(p)

    p = sub.add_parser("download", help="pre-fetch everything a model needs, for offline sites")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--revision", default=None)
    _common(p)

    p = sub.add_parser("info", help="versions, device, cache paths and the known models")
    p.add_argument("--probe", action="store_true", help="import torch to ask it for the device (slower)")
    _common(p)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def expand_paths(patterns: Sequence[str]) -> Iterator[tuple]:
    """(file, base folder or None) for files, folders (recursive) and globs, in the order given."""
    from .data.files import iter_image_files

    for pattern in patterns:
        matches: List[str] = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern, recursive=True))
        if not matches:
            yield Path(pattern), None  # reported as an error row
        for m in matches:
            path = Path(m)
            if path.is_dir():
                for f in iter_image_files(path, recursive=True):
                    yield f, path
            else:
                yield path, None


def _load_detector(args: argparse.Namespace):
    if args.model is not None and command_uses_onnx(args):
        from .onnx.runtime import load

        return load(args.model, runtime=args.runtime)  # an ONNX export: onnxruntime or OpenVINO, no torch
    if getattr(args, "runtime", "onnxruntime") != "onnxruntime":
        raise VisualADError(f"--runtime {args.runtime} runs ONNX exports; --model {args.model} is not one "
                            "(visualad export makes one)")
    try:
        from . import AnomalyDetector
    except ImportError as exc:
        raise VisualADError(f"this model runs on torch, which is not installed ({exc}): pip install visualad; "
                            "the torch-free runtime runs ONNX exports (visualad export) only") from None
    return AnomalyDetector.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                           image_size=args.image_size)


def command_uses_onnx(args: argparse.Namespace) -> bool:
    from .onnx.meta import is_export

    return args.command in ("predict", "serve") and Path(args.model).is_dir() and is_export(args.model)


def _references(det, folder: Optional[Path], calibrate: bool = False) -> None:
    """Set the references of ``folder``; ``calibrate``: they set their own thresholds when the model holds
    none for them (leave-one-out, :meth:`Predictor.set_references`)."""
    if folder is None:
        return
    refs = [f for f, _ in expand_paths([str(folder)])]
    if not refs:
        raise VisualADError(f"no images found under {folder}", folder)
    det.set_references(refs, calibrate=calibrate)


def _announce_mode(args: argparse.Namespace, det, scorer, n: int) -> None:
    if args.quiet:
        return
    print(f"visualad {args.command}: {scorer.name} mode ({scorer.why(n, det.config.head_trained)})", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    import time

    from .outputs import OutputFiles, real_path
    from .rows import RowWriter, input_key

    if args.resume and args.out is None:
        raise VisualADError("--resume needs --out (the file whose rows are kept)")
    inputs = list(expand_paths(args.paths))
    if not inputs:
        raise VisualADError("no images found under " + ", ".join(args.paths))
    files = OutputFiles.for_inputs(inputs, overlays=args.overlays, maps=args.save_maps, map_format=args.map_format,
                                   style=args.overlay_style, cmap=args.cmap, alpha=args.alpha)
    keys = [input_key(p) for p, _ in inputs]
    if args.out is not None and real_path(args.out) in {real_path(p) for p, _ in inputs}:
        raise VisualADError("--out is one of the inputs; choose another file for the rows", args.out)
    writer = RowWriter(args.out, resume=args.resume, inputs=keys, run=_run_settings(args)) if args.out else None
    start = time.perf_counter()
    rows = _predict_rows_ray if args.engine == "ray" else _predict_rows
    try:
        counts = rows(args, inputs, keys, writer, files)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    if writer is not None:
        writer.commit()
    if not args.quiet:
        rate = counts.scored / max(time.perf_counter() - start, 1e-9)
        kept = len(writer.kept) if writer is not None else 0
        print(f"visualad predict: {len(inputs)} inputs" + (f" in {counts.mode}" if counts.mode else "")
              + f", {counts.flagged} flagged, {counts.failed} failed"
              + (f", {kept} kept from the earlier run" if kept else "") + f", {rate:.1f} images/s"
              + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
        decisions = counts.point or "no threshold, so no decisions"
        print(f"visualad predict: {decisions}" + (f"; next: {counts.next_step}" if counts.next_step else ""),
              file=sys.stderr)
    if counts.failed:
        if args.quiet:
            print(f"visualad predict: {counts.failed} of {len(inputs)} inputs failed (see the 'error' fields)",
                  file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _run_settings(args: argparse.Namespace) -> dict:
    """What changes a row, as asked for on the command line (with fingerprints of the model's and the references'
    files): ``--resume`` keeps only rows written with the same."""
    import hashlib

    from .rows import input_key

    def fingerprint(keys: list) -> Optional[str]:
        return hashlib.sha256(repr(keys).encode()).hexdigest()[:16] if keys else None

    model_files = []
    if args.model is not None and Path(args.model).is_dir():  # a local model or export: its settings file
        model_files = [input_key(Path(args.model) / n) for n in ("config.json", "visualad_onnx.json")]
    refs = [input_key(f) for f, _ in expand_paths([str(args.references)])] if args.references else []
    return {"model": args.model, "model_files": fingerprint([k for k in model_files if k]), "mode": args.mode,
            "threshold": args.threshold, "image_size": args.image_size, "dtype": args.dtype,
            "compare_with": args.compare_with, "references": fingerprint(refs)}


class Tally(NamedTuple):
    """What predict's summary says: counts, the decisions' operating point, the mode and why, the next step."""

    scored: int
    flagged: int
    failed: int
    point: Optional[str] = None
    mode: str = ""
    next_step: str = ""


def _predict_rows_ray(args: argparse.Namespace, inputs: List[tuple], keys: List, writer, files) -> Tally:
    """The rows of local predict, scored by Ray actors (see :mod:`visualad.scale.ray_predict`)."""
    if args.overlays is not None or args.resume:
        raise VisualADError("--engine ray writes rows and maps: --overlays and --resume are local")
    try:
        from .scale.ray_predict import predict_with_ray
    except ImportError as exc:
        raise VisualADError(f"--engine ray needs the ray extra: pip install 'visualad[ray]' ({exc})") from None
    refs = [str(f) for f, _ in expand_paths([str(args.references)])] if args.references else None
    flagged = failed = 0
    point = mode = None
    for key, row in zip(keys, predict_with_ray(inputs, args.model, mode=args.mode, address=args.ray_address,
                                               device=args.device if args.device != "auto" else "cpu",
                                               dtype=args.dtype, batch_size=args.batch_size,
                                               compare_with=args.compare_with, threshold=args.threshold,
                                               references=refs, maps=args.save_maps, map_format=args.map_format)):
        _emit(row, key, writer)
        failed += row.get("error") is not None
        flagged += bool(row.get("label"))
        point = point or row.get("operating_point")
        mode = mode or row.get("mode")
    return Tally(len(inputs), flagged, failed, point, f"{mode} mode" if mode else "", "" if point else NO_THRESHOLD)


def _emit(row: dict, key, writer) -> None:
    """A finished row, with its input's size and mtime (what --resume keys on), to --out or standard output."""
    if key is not None:
        row["file_size"], row["file_mtime_ns"] = key[1], key[2]
    if writer is not None:
        writer.write(row)
    else:
        print(json.dumps(row), flush=True)


def _predict_rows(args: argparse.Namespace, inputs: List[tuple], keys: List, writer, files) -> Tally:
    """Score the inputs not kept by ``--resume``; write a row each (and its files); return the tally."""
    todo = [i for i, k in enumerate(keys) if writer is None or not writer.done(k)]
    if not todo:
        return Tally(0, 0, 0)
    det = _load_detector(args)
    _references(det, args.references, calibrate=args.threshold is None and uses_references(args.mode))
    scorer = det.scoring_mode(args.mode, len(todo), compare_with=args.compare_with)
    if scorer.kind != "images" and writer is not None and writer.kept:
        raise VisualADError("--resume works in head and references mode: batch mode scores the whole set "
                            "together; run again without --resume")
    _announce_mode(args, det, scorer, len(todo))
    # full-size maps only when something reads them: pictures, saved maps, or regions (a pixel threshold)
    full = files.needs_full_map or det.config.pixel_threshold is not None
    results = det.predict_iter([inputs[i][0] for i in todo], batch_size=args.batch_size, threshold=args.threshold,
                               on_error="return", keep_image=files.needs_image, progress=not args.quiet,
                               mode=scorer, at_model_size=not full)
    flagged = failed = 0
    point = None
    for i, res in zip(todo, results):
        if res.image_path is None:
            res.image_path = str(inputs[i][0])
        _emit(files.row(i, res), keys[i], writer)
        failed += not res.ok
        flagged += bool(res.pred_label)
        point = point or res.operating_point
    n_normal = (det.config.score_stats or {}).get("n_normal") if args.threshold is None else None
    mode = f"{scorer.name} mode ({scorer.why(len(todo), det.config.head_trained)})"
    return Tally(len(todo), flagged, failed, point, mode, scorer.next_step(point is not None, n_normal))


def cmd_eval(args: argparse.Namespace) -> int:
    from .tasks.evaluate import format_table

    det = _load_detector(args)
    report = det.evaluate(args.root, out=args.out, format=args.format, batch_size=args.batch_size,
                          at_original_resolution=args.at_original_resolution, aupro_variant=args.aupro_variant,
                          shots=args.shots, progress=not args.quiet, mode=args.mode,
                          compare_with=args.compare_with, overlays=args.overlays, overlay_style=args.overlay_style,
                          cmap=args.cmap, alpha=args.alpha)
    print(format_table(report))
    if args.out:
        print(f"report written to {args.out}")
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import AnomalyDetector

    det = AnomalyDetector.from_pretrained(args.model, device=args.device, image_size=args.image_size)
    if args.fresh_head:
        det = det.with_fresh_head(seed=args.seed)
    if not args.quiet:
        print(f"visualad finetune: starting from {det.start}", file=sys.stderr)
    train_args = {k: v for k, v in dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                        include_train_normals=args.include_train_normals or None).items()
                  if v is not None}
    report = det.finetune(args.root, out_dir=args.out, resume=args.resume, seed=args.seed,
                          synthesize=args.synthesize, gradient_checkpointing=args.gradient_checkpointing,
                          progress=not args.quiet, **train_args)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 wrote the model and speaks for the run
        keys = ("epochs", "steps", "final_loss", "seconds", "world_size")
        print(json.dumps({k: report[k] for k in keys if k in report}))
        data = report["data"]
        classes = ", ".join(f"{c}: {v['normal']} normal, {v['anomalous']} anomalous"
                            for c, v in data["by_class"].items())
        print(f"trained on {data['n_images']} images ({data['splits']['test']} from the test split, "
              f"{data['splits']['train']} from the train split; {classes}; "
              + ("synthetic anomalies on the normal images" if data["synthetic_anomalies"] else
                 f"{data['n_anomalous']} real anomalies, {data['n_anomalous_with_mask']} with masks") + ")")
        print(f"model written to {args.out}")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .data.files import iter_image_files

    det = _load_detector(args)
    normals = list(iter_image_files(args.normal_dir))
    if not normals:
        raise VisualADError(f"no images found under {args.normal_dir}", args.normal_dir)
    anomalous = list(iter_image_files(args.anomalous)) if args.anomalous else None
    _references(det, args.references)
    kwargs = {} if args.percentile is None else {"percentile": args.percentile}
    kwargs.update(false_alarm_rate=args.false_alarm_rate, target_recall=args.target_recall,
                  operating_point=args.operating_point)
    scorer = det.scoring_mode(args.mode, len(normals), compare_with=args.compare_with)
    _announce_mode(args, det, scorer, len(normals))
    det.calibrate(normals, anomalous, batch_size=args.batch_size, progress=not args.quiet, mode=scorer, **kwargs)
    det.save_pretrained(args.out)
    cfg = det.config
    print(f"image threshold {cfg.image_threshold:.6g}, pixel threshold {cfg.pixel_threshold:.6g}; "
          f"model written to {args.out}")
    for name, point in cfg.score_stats["operating_points"].items():  # every candidate, the chosen one marked
        chosen = "*" if name == cfg.score_stats["operating_point"]["name"] else " "
        print(f" {chosen} {name}: {point['threshold']:.6g}  {point['description']}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights.official import convert_official

    out = convert_official(args.checkpoint, args.out, backbone=args.backbone,
                           backbone_weights=args.backbone_weights, load_final_norm=args.load_final_norm)
    print(f"converted model written to {out}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    from .weights.download import download_model

    path = download_model(args.name, revision=args.revision)
    where = f"({path})" if path is not None else "(a backbone alone: references and batch mode)"
    print(f"{args.name}: everything is cached {where}")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """Versions from the installed distributions' metadata, not by importing them (torch alone takes seconds);
    ``--probe`` imports torch to ask it for the device."""
    import platform
    from importlib import metadata

    from .paths import cache_dir
    from .weights.manifest import load_manifest

    lines = [f"visualad {__version__}", f"python {platform.python_version()}"]
    for dist in ("torch", "timm", "open_clip_torch", "huggingface_hub", "safetensors", "numpy", "pillow",
                 "opencv-python-headless", "onnxruntime", "openvino"):
        try:
            lines.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{dist} not installed")
    if args.probe:
        import torch

        cuda = torch.cuda.is_available()
        lines.append(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}")
    else:
        gpus = len(list(Path("/proc/driver/nvidia/gpus").glob("*")))
        found = f"{gpus} NVIDIA GPU(s) with a driver" if gpus else "cpu (no NVIDIA driver found)"
        lines.append(f"device: {found}; --probe asks torch")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME") or os.path.join(cache,
                                                                                                "huggingface"), "hub")
    lines.append(f"hub cache: {hub}")
    lines.append(f"visualad cache: {cache_dir()}")
    manifest = load_manifest()
    lines.append("models:")
    for name in sorted(manifest.models):
        entry = manifest.models[name]
        default = " (default)" if name == manifest.default else ""
        lines.append(f"  {name}{default}: backbone {entry['backbone']}; {entry.get('status', '')}")
    for alias, target in sorted(manifest.aliases.items()):
        lines.append(f"  {alias} -> {target}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve.app import create_app
    except ImportError as exc:
        raise VisualADError(f"visualad serve needs the serve extra: pip install 'visualad[serve]' ({exc.name} "
                            "is missing)") from None
    det = _load_detector(args)
    _references(det, args.references, calibrate=True)
    name = Path(args.model).name if args.model else "visualad"
    app = create_app(det, model_name=name, token=args.token, max_batch_size=args.max_batch_size,
                     max_latency_ms=args.max_latency_ms, max_upload_mb=args.max_upload_mb,
                     max_images=args.max_images, max_decode_mp=args.max_decode_mp,
                     allowed_hosts=[args.host, *args.allow_host])
    print(f"visualad serve: http://{args.host}:{args.port}/ serving {name!r}; Ctrl-C or SIGTERM stops",
          file=sys.stderr)
    # uvicorn shuts down gracefully on SIGTERM (requests in flight finish), then raises the signal again for the
    # handler it found: a no-op one here, so that a clean stop exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info")
    global _skip_teardown
    _skip_teardown = True
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from . import AnomalyDetector

    det = AnomalyDetector.from_pretrained(args.model, device="cpu", dtype="fp32", image_size=args.image_size)
    _references(det, args.references)
    out = det.export_onnx(args.out)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MB" for p in sorted(out.glob("*.onnx")))
    print(f"ONNX export written to {out} ({sizes})")
    return EXIT_OK


#: each command's input paths, checked before any model is loaded
INPUT_PATHS = {"predict": ("paths", "references"), "eval": ("root",), "finetune": ("root",),
               "calibrate": ("normal_dir", "anomalous", "references"), "convert-official": ("checkpoint",
               "backbone_weights"), "export": ("references",), "serve": ("references",)}


def check_inputs(args: argparse.Namespace) -> None:
    """Fail fast: an input path that does not exist (a glob that matches nothing) is an error before the model
    loads, all such paths named in one line."""
    given: List[str] = []
    for name in INPUT_PATHS.get(args.command, ()):
        value = getattr(args, name, None)
        given += [] if value is None else [str(v) for v in value] if isinstance(value, list) else [str(value)]
    missing = [p for p in given if not os.path.exists(p) and not glob.glob(p, recursive=True)]
    if missing:
        raise VisualADError("no such file or folder: " + ", ".join(missing))


COMMANDS = {"predict": cmd_predict, "eval": cmd_eval, "finetune": cmd_finetune, "calibrate": cmd_calibrate,
            "convert-official": cmd_convert, "export": cmd_export, "serve": cmd_serve, "download": cmd_download,
            "info": cmd_info}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a run stops the way Ctrl-C stops it (files cleaned up)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def console() -> None:
    """The ``visualad`` command: :func:`main`, then exit. A stopped server skips the interpreter's teardown
    (about a second for torch's modules alone), so that SIGTERM ends it at once; nothing is left to finalise."""
    code = main()
    if _skip_teardown:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


_skip_teardown = False  # set by a server that stopped cleanly


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_FAILED
    _setup_logging(args)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        check_inputs(args)
        return COMMANDS[args.command](args)
    except VisualADError as exc:
        print(f"visualad {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `visualad predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_OK
    except OSError as exc:  # an output path under a file, a read-only or full disk...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"visualad {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("visualad: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("visualad: terminated", file=sys.stderr)
        return 143
    except Exception as exc:  # noqa: BLE001 - a bug or a library's surprise: one line; the traceback with -v
        logging.getLogger(__name__).debug("the traceback of the unexpected error", exc_info=True)
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"visualad {args.command}: unexpected error: {type(exc).__name__}: {text}"
              + ("" if args.verbose else " (run again with -v for the traceback)"), file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
