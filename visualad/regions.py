"""Connected regions of a predicted mask, in NumPy (no OpenCV: the torch-free runtime computes them too).

8-connected components from the runs of each row: two runs of neighbouring rows touch when their column
ranges overlap or meet diagonally; a union-find over runs joins them. Work grows with the number of runs,
not pixels, which is small for thresholded smooth maps.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

Run = Tuple[int, int, int]  # row, first column, last column (inclusive)


def _runs(mask: np.ndarray) -> List[List[Run]]:
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    out: List[List[Run]] = []
    for y in range(mask.shape[0]):
        starts, ends = np.flatnonzero(edges[y] == 1), np.flatnonzero(edges[y] == -1) - 1
        out.append([(y, int(s), int(e)) for s, e in zip(starts, ends)])
    return out


def regions(mask: np.ndarray, values: np.ndarray) -> List[Dict[str, float]]:
    """8-connected regions of ``mask`` [H, W], most anomalous first: bounding box (x, y, width, height in
    pixels), area in pixels and peak of ``values`` inside (ties: raster order of each region's first pixel)."""
    rows = _runs(np.asarray(mask, bool))
    runs = [r for row in rows for r in row]
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    base = 0
    for y in range(1, len(rows)):
        prev, cur = rows[y - 1], rows[y]
        start = base + len(prev)
        i = j = 0
        while i < len(prev) and j < len(cur):
            (_, s1, e1), (_, s2, e2) = prev[i], cur[j]
            if s1 <= e2 + 1 and s2 <= e1 + 1:
                a, b = find(base + i), find(start + j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if e1 < e2:
                i += 1
            else:
                j += 1
        base = start
    found: Dict[int, Dict[str, float]] = {}
    for k, (y, s, e) in enumerate(runs):
        root = find(k)
        peak = float(values[y, s:e + 1].max())
        r = found.get(root)
        if r is None:
            found[root] = {"x0": s, "x1": e, "y0": y, "y1": y, "area": e - s + 1, "peak": peak}
            continue
        r["x0"], r["x1"], r["y1"] = min(r["x0"], s), max(r["x1"], e), y
        r["area"] += e - s + 1
        r["peak"] = max(r["peak"], peak)
    out = [{"x": int(r["x0"]), "y": int(r["y0"]), "width": int(r["x1"] - r["x0"] + 1),
            "height": int(r["y1"] - r["y0"] + 1), "area": int(r["area"]), "peak": r["peak"]}
           for _, r in sorted(found.items())]
    return sorted(out, key=lambda r: -r["peak"])
