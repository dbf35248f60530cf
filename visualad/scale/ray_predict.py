"""Prediction over archives too big for one machine, with Ray Data (the ``ray`` extra).

The driver lists the inputs (paths only); ``map_batches`` sends them to actors that each load the model once
(a callable class, CPU or one GPU each) and score their share with the local engine, so a row is exactly what
local ``predict`` writes and a broken file is an error row, never a failed job. Batch mode scores sets grouped
by a key (the input's folder by default) with ``groupby().map_groups``: a set never spans two folders. Rows
stream back to the driver in input order. A local Ray is started when no address is given.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..modes.choice import uses_references
from ..result import ROW_COLUMNS

logger = logging.getLogger(__name__)


class Scorer:
    """A Ray actor's model: loaded once in ``__init__``, then called on batches (or sets) of paths. Every
    actor scores in the one mode the driver chose for the whole input."""

    def __init__(self, model: Optional[str], mode: str, device: str, dtype: str, batch_size: int,
                 compare_with: int, threshold: Optional[float], references: Optional[List[str]],
                 threads: int, map_format: str = "npy", full_maps: bool = False) -> None:
        import torch

        from ..detector import AnomalyDetector

        if threads > 0:
            torch.set_num_threads(threads)
        self.det = AnomalyDetector.from_pretrained(model, device=device, dtype=dtype)
        if references:  # self-calibrated as local predict is (each actor alike: it is deterministic)
            self.det.set_references(references, calibrate=threshold is None and uses_references(mode))
        self.mode, self.batch_size, self.full_maps = mode, batch_size, full_maps
        self.compare_with, self.threshold, self.map_format = compare_with, threshold, map_format

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, List[Any]]:
        from ..errors import VisualADError
        from ..outputs import OutputFiles

        paths = [str(p) for p in batch["path"]]
        maps = [Path(str(m)) for m in batch["map"]]  # "" when no map is kept
        files = OutputFiles(maps=maps, masks=[Path(str(m)) for m in batch["mask"]],
                            map_format=self.map_format) if str(batch["map"][0]) else OutputFiles()
        try:
            results = list(self.det.predict_iter(paths, batch_size=self.batch_size, on_error="return",
                                                 threshold=self.threshold, mode=self.mode,
                                                 compare_with=self.compare_with, at_model_size=not self.full_maps))
            rows = []
            for i, (path, res) in enumerate(zip(paths, results)):
                res.image_path = path
                rows.append(files.row(i, res))
        except VisualADError as exc:  # e.g. a batch-mode set of fewer than 4 images: error rows, not a failed job
            rows = [{"path": path, "score": None, "mode": self.mode, "error": str(exc), "regions": []}
                    for path in paths]
        out: Dict[str, List[Any]] = {k: [json.dumps(r.get(k)) if k in _JSON else r.get(k) for r in rows]
                                     for k in ROW_COLUMNS}
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
    """Rows of ``inputs`` (file, the folder it was found in), in input order, scored on a Ray cluster, the rows
    of local predict. The mode is chosen once, here, for the whole input (the rule of local predict); a set
    mode scores each folder whole. With ``maps`` (a folder every worker can write) each raw map and predicted
    mask is written there, named as local predict names them."""
    import ray

    from ..detector import AnomalyDetector
    from ..outputs import OutputFiles

    det = AnomalyDetector.from_pretrained(model, device="cpu")  # the driver's copy decides the mode
    if references:
        det.set_references(references)
    scorer = det.scoring_mode(mode, len(inputs), compare_with=compare_with)
    name, full_maps = scorer.describe()["mode"], maps is not None or det.config.pixel_threshold is not None
    del det
    _start(address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    cpus = int(ray.available_resources().get("CPU", 1))
    gpu = device.startswith("cuda")
    # one CPU stays free for Ray Data's own tasks (an actor pool that takes every CPU can stall the pipeline)
    n_actors = actors or (int(ray.available_resources().get("GPU", 1)) if gpu else max(1, cpus - 1))
    empty = [""] * len(inputs)
    files = OutputFiles.for_inputs(inputs, maps=maps, map_format=map_format)  # local predict's names and checks
    targets, masks = files.maps or empty, files.masks or empty
    items = [{"index": i, "path": str(p), "map": str(t), "mask": str(m),
              "group": str(Path(p).parent) if group_by == "folder" else ""}
             for i, ((p, _), t, m) in enumerate(zip(inputs, targets, masks))]
    kwargs = dict(fn_constructor_kwargs={"model": model, "mode": name, "device": device, "dtype": dtype,
                                         "batch_size": batch_size, "compare_with": compare_with,
                                         "threshold": threshold, "references": references,
                                         "threads": 0 if gpu else max(1, (cpus - 1) // n_actors),
                                         "map_format": map_format, "full_maps": full_maps},
                  concurrency=n_actors, batch_format="numpy",
                  **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * n_actors)))
    whole_sets = scorer.kind != "images"
    if whole_sets:
        ds = ds.groupby("group").map_groups(Scorer, **kwargs)  # one set per folder
        rows = sorted(ds.iter_rows(), key=lambda r: r["index"])  # groups come back by group, rows by input
    else:
        rows = ds.map_batches(Scorer, batch_size=max(batch_size, 1) * 4, **kwargs).iter_rows()
    for row in rows:
        out = {k: json.loads(row[k]) if k in _JSON else _plain(row.get(k)) for k in ROW_COLUMNS}
        yield {k: v for k, v in out.items() if v is not None or k in _ALWAYS}


#: columns that travel through Arrow as JSON text (lists of objects, pairs)
_JSON = ("regions", "map_range")
#: the keys every row has (the others only when they have a value, as in local rows)
_ALWAYS = ("path", "score", "label", "normalized_score", "threshold", "mode", "error", "regions")


def _plain(value: Any) -> Any:
    """NumPy scalars from Arrow back to JSON types (NaN scores are None, as local rows write them)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
