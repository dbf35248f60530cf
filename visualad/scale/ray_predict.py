"""Prediction over archives too big for one machine, with Ray Data (the ``ray`` extra).

The driver lists the inputs (paths only); ``map_batches`` sends them to actors that each load the model once
(a callable class, CPU or one GPU each) and score their share with the local engine, so a row is exactly what
local ``predict`` writes and a broken file is an error row, never a failed job. Batch mode scores sets grouped
by a key (the input's folder by default) with ``groupby().map_groups``: a set never spans two folders. Rows
stream back to the driver in input order. A local Ray is started when no address is given.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

COLUMNS = ("path", "score", "label", "normalized_score", "threshold", "mode", "error", "height", "width", "map_path",
           "map_range")


class Scorer:
    """A Ray actor's model: loaded once in ``__init__``, then called on batches of paths."""

    def __init__(self, model: Optional[str], mode: str, device: str, dtype: str, batch_size: int,
                 compare_with: int, threshold: Optional[float], references: Optional[List[str]],
                 threads: int, map_format: str = "npy") -> None:
        import torch

        from ..detector import AnomalyDetector

        if threads > 0:
            torch.set_num_threads(threads)
        self.det = AnomalyDetector.from_pretrained(model, device=device, dtype=dtype)
        if references:
            self.det.set_references(references)
        self.mode, self.batch_size = mode, batch_size
        self.compare_with, self.threshold, self.map_format = compare_with, threshold, map_format

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, List[Any]]:
        from ..errors import VisualADError

        from ..outputs import write_map

        paths = [str(p) for p in batch["path"]]
        maps = [str(m) for m in batch["map"]]  # "" when no map is kept
        rows = []
        try:
            mode = self.det.scoring_mode(self.mode, len(paths), compare_with=self.compare_with)
            results = list(self.det.predict_iter(paths, batch_size=self.batch_size, on_error="return",
                                                 threshold=self.threshold, mode=mode,
                                                 at_model_size=not any(maps)))
        except VisualADError as exc:  # e.g. a batch-mode set of fewer than 4 images: error rows, not a failed job
            results = [None] * len(paths)
            reason = str(exc)
        for path, target, res in zip(paths, maps, results):
            row = res.to_dict() if res is not None else {"path": path, "score": None, "error": reason}
            if res is not None and res.ok and target:
                try:
                    row.update(write_map(Path(target), res.anomaly_map, self.map_format))
                except OSError as exc:  # this row fails, not the job
                    row["error"] = f"not written: {target}: {exc.strerror or exc}"
            row["path"] = path
            rows.append(row)
        out: Dict[str, List[Any]] = {k: [r.get(k) for r in rows] for k in COLUMNS}
        out["index"] = [int(i) for i in batch["index"]]
        return out


def _start(address: Optional[str]) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, configure_logging=False)


def predict_with_ray(inputs: Sequence[Tuple[Path, Optional[Path]]], model: Optional[str], mode: str = "auto",
                     address: Optional[str] = None, device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                     compare_with: int = 64, threshold: Optional[float] = None,
                     references: Optional[List[str]] = None, actors: int = 0, group_by: str = "folder",
                     maps: Optional[Path] = None, map_format: str = "npy") -> Iterator[Dict[str, Any]]:
    """Rows of ``inputs`` (file, the folder it was found in), in input order, scored on a Ray cluster; with
    ``maps`` (a folder every worker can write) each raw map is written there, named as local predict names it."""
    import ray

    from ..outputs import target_paths

    _start(address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    cpus = int(ray.available_resources().get("CPU", 1))
    gpu = device.startswith("cuda")
    # one CPU stays free for Ray Data's own tasks (an actor pool that takes every CPU can stall the pipeline)
    n_actors = actors or (int(ray.available_resources().get("GPU", 1)) if gpu else max(1, cpus - 1))
    targets = (target_paths(inputs, maps, ".npy" if map_format == "npy" else ".png") if maps is not None
               else [""] * len(inputs))
    items = [{"index": i, "path": str(p), "map": str(t), "group": str(Path(p).parent) if group_by == "folder" else ""}
             for i, ((p, _), t) in enumerate(zip(inputs, targets))]
    kwargs = dict(fn_constructor_kwargs={"model": model, "mode": mode, "device": device, "dtype": dtype,
                                         "batch_size": batch_size, "compare_with": compare_with,
                                         "threshold": threshold, "references": references,
                                         "threads": 0 if gpu else max(1, (cpus - 1) // n_actors),
                                         "map_format": map_format},
                  concurrency=n_actors, batch_format="numpy",
                  **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * n_actors)))
    if mode == "batch":
        ds = ds.groupby("group").map_groups(Scorer, **kwargs)  # one set per folder
    else:
        ds = ds.map_batches(Scorer, batch_size=max(batch_size, 1) * 4, **kwargs)
    rows = list(ds.iter_rows()) if mode == "batch" else ds.iter_rows()
    if mode == "batch":
        rows = sorted(rows, key=lambda r: r["index"])  # groups come back by group, rows go out by input
    for row in rows:
        out = {k: _plain(row.get(k)) for k in COLUMNS}
        yield out


def _plain(value: Any) -> Any:
    """NumPy scalars from Arrow back to JSON types (NaN scores are None, as local rows write them)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
