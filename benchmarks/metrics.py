"""Benchmark visualad.metrics.pixel_metrics against the authors' way of computing the same numbers.

    python benchmarks/metrics.py [--n 100] [--size 518] [--seed 0] [--skip-theirs-pro]

Workload: ``n`` synthetic anomaly maps of ``size`` x ``size`` (fixed seed); half of the images carry 1-3
elliptical defects; map = Gaussian-smoothed (sigma 4, as the authors smooth) noise + signal in the blobs.

"Theirs" is the authors' metric code re-implemented here: one scikit-learn call per metric over all
flattened pixels (``roc_auc_score``, ``average_precision_score``, ``precision_recall_curve`` -> F1-max)
and ``cal_pro_score``: 200 thresholds, connected components per threshold (scipy.ndimage.label with
8-connectivity standing in for skimage, which is not installed).

Each implementation runs in a forked child process; time is wall-clock, memory is the child's peak RSS
increase (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end minus at the start of the child), so
the shared input arrays are not counted and nothing is traced (no tracemalloc overhead).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visualad.metrics import aupro, pixel_metrics  # noqa: E402

log = logging.getLogger("benchmarks.metrics")


# ------------------------------------------------------------------------------------------------ data


def make_data(n: int, size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    import cv2

    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size / 518.0
    for i in range(n):
        m = masks[i]
        if i % 2 == 1:
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(0.15, 0.85, 2) * size
                a, b = rng.uniform(8, 40, 2) * scale
                t = rng.uniform(0, np.pi)
                u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
                v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
                m |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
        raw = rng.normal(0.0, 1.0, (size, size)).astype(np.float32) + 0.3 * m
        maps[i] = cv2.GaussianBlur(raw, (0, 0), 4.0)
    return maps, masks


# ---------------------------------------------------------------------------------------------- theirs


def their_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def their_ap(maps: np.ndarray, masks: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(masks.ravel(), maps.ravel()))


def their_f1(maps: np.ndarray, masks: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    p, r, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    return float(np.max(2 * p * r / (p + r + 1e-8)))


def their_pro(maps: np.ndarray, masks: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """``cal_pro_score`` as in the authors' utils/metrics.py (FPR <= 0.3 kept, as VisualAD does)."""
    from scipy import ndimage
    from sklearn.metrics import auc

    structure = np.ones((3, 3), int)
    binary_amaps = np.zeros_like(maps, dtype=bool)
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[maps <= th], binary_amaps[maps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            lab, n_lab = ndimage.label(mask, structure=structure)  # skimage measure.label(mask)
            for r, sl in enumerate(ndimage.find_objects(lab), start=1):  # measure.regionprops(...)
                region = lab[sl] == r
                pro.append(binary_amap[sl][region].sum() / region.sum())
        inverse_masks = 1 - masks.astype(np.uint8)
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fprs.append(fp_pixels / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros_a, fprs_a = np.array(pros), np.array(fprs)
    idx = fprs_a <= expect_fpr
    if idx.sum() < 2:
        return 0.0
    f = fprs_a[idx]
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, pros_a[idx]))


# ------------------------------------------------------------------------------------------- reference


def slow_exact_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """The MVTec definition, literally: a threshold at every distinct score, trapezoid to exactly `limit`."""
    from scipy import ndimage

    regions = []
    for i, m in enumerate(masks):
        lab, n_lab = ndimage.label(m, structure=np.ones((3, 3), int))
        regions += [(i, lab == r) for r in range(1, n_lab + 1)]
    neg = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        ys.append(float(np.mean([pred[i][r].mean() for i, r in regions])))
        xs.append(float((pred & neg).sum() / neg.sum()))
        if xs[-1] > limit:
            break
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            area += (limit - x0) * (y0 + y0 + (y1 - y0) * (limit - x0) / (x1 - x0)) / 2
            break
    return area / limit


# -------------------------------------------------------------------------------------------- harness


def measured(fn: Callable[[], Any]) -> Tuple[Any, float, float]:
    """Run ``fn`` in a forked child: (result, seconds, peak RSS increase in MiB)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            value = fn()
            dt = time.perf_counter() - t0
            rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            payload = pickle.dumps((value, dt, (rss1 - rss0) / 1024.0))
        except BaseException as exc:  # report, never hang the parent
            payload = pickle.dumps(exc)
        with os.fdopen(w, "wb") as fh:
            fh.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    out = pickle.loads(data)
    if isinstance(out, BaseException):
        raise out
    return out


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-theirs-pro", action="store_true", help="skip the slow 200-threshold loop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import cv2  # noqa: F401  imported before forking: import time and memory are not measured
    import scipy.ndimage  # noqa: F401
    import sklearn.metrics  # noqa: F401

    t0 = time.perf_counter()
    maps, masks = make_data(args.n, args.size, args.seed)
    log.info(
        "data: %d maps %dx%d = %.1f M pixels, %.2f %% anomalous, %d anomalous images (%.1f s to make)",
        args.n, args.size, args.size, maps.size / 1e6, 100 * masks.mean(), int(masks.any((1, 2)).sum()),
        time.perf_counter() - t0,
    )

    ours_all, t_ours_all, m_ours_all = measured(lambda: pixel_metrics(maps, masks))
    ours_rank, t_ours_rank, m_ours_rank = measured(lambda: pixel_metrics(maps, masks, with_aupro=False))
    ours_pro, t_ours_pro, m_ours_pro = measured(lambda: aupro(maps, masks))
    ours_zsad, t_ours_zsad, _ = measured(lambda: aupro(maps, masks, variant="zsad"))

    theirs: Dict[str, Tuple[float, float, float]] = {}
    for name, fn in (("auroc", their_auroc), ("ap", their_ap), ("f1_max", their_f1)):
        theirs[name] = measured(lambda fn=fn: fn(maps, masks))
        log.info("theirs %-6s done in %.1f s", name, theirs[name][1])
    if not args.skip_theirs_pro:
        theirs["aupro"] = measured(lambda: their_pro(maps, masks))
        log.info("theirs aupro  done in %.1f s", theirs["aupro"][1])

    rows = []
    hdr = f"{'metric':<26}{'ours':>10}{'theirs':>10}{'abs diff':>10}{'ours s':>8}{'theirs s':>9}{'ratio':>8}"
    hdr += f"{'ours MiB':>10}{'theirs MiB':>11}"
    rows.append(hdr)
    rows.append("-" * len(hdr))
    t_rank_theirs = sum(theirs[k][1] for k in ("auroc", "ap", "f1_max"))
    for k in ("auroc", "ap", "f1_max"):
        v, t, mem = theirs[k]
        rows.append(
            f"{'pixel ' + k:<26}{ours_rank[k]:>10.6f}{v:>10.6f}{abs(ours_rank[k] - v):>10.1e}{'(a)':>8}{t:>9.2f}"
            f"{'':>8}{'(a)':>10}{mem:>11.0f}"
        )
    rows.append(
        f"{'(a) auroc+ap+f1, one sort':<26}{'':>10}{'':>10}{'':>10}{t_ours_rank:>8.2f}{t_rank_theirs:>9.2f}"
        f"{t_rank_theirs / t_ours_rank:>7.1f}x{m_ours_rank:>10.0f}"
        f"{max(theirs[k][2] for k in ('auroc', 'ap', 'f1_max')):>11.0f}"
    )
    if "aupro" in theirs:
        v, t, mem = theirs["aupro"]
        rows.append(
            f"{'aupro zsad (200 thr)':<26}{ours_zsad:>10.6f}{v:>10.6f}{abs(ours_zsad - v):>10.1e}{t_ours_zsad:>8.2f}"
            f"{t:>9.2f}{t / t_ours_zsad:>7.1f}x{'':>10}{mem:>11.0f}"
        )
        rows.append(
            f"{'aupro mvtec (ours) vs zsad':<26}{ours_pro:>10.6f}{v:>10.6f}{abs(ours_pro - v):>10.1e}{t_ours_pro:>8.2f}"
            f"{t:>9.2f}{t / t_ours_pro:>7.1f}x{m_ours_pro:>10.0f}{mem:>11.0f}"
        )
    t_theirs_all = t_rank_theirs + (theirs["aupro"][1] if "aupro" in theirs else 0.0)
    label = "overall (all four)" if "aupro" in theirs else "overall (no their aupro)"
    rows.append(
        f"{label:<26}{'':>10}{'':>10}{'':>10}{t_ours_all:>8.2f}{t_theirs_all:>9.2f}"
        f"{t_theirs_all / t_ours_all:>7.1f}x{m_ours_all:>10.0f}{max(x[2] for x in theirs.values()):>11.0f}"
    )
    log.info("\n".join([""] + rows))
    log.info(
        "ours s / MiB of 'overall' = one pixel_metrics() call computing all four (AUPRO = MVTec definition);"
        " MiB = peak RSS increase of a forked child (getrusage ru_maxrss delta)"
    )
    log.info(
        "pixel_metrics() values: auroc %.6f  ap %.6f  f1_max %.6f  aupro %.6f",
        ours_all["auroc"], ours_all["ap"], ours_all["f1_max"], ours_all["aupro"],
    )

    # AUPRO: ours vs the definition, written slowly, on a downscaled subset (too slow at full size).

    idx = np.r_[np.flatnonzero(masks.any((1, 2)))[:4], np.flatnonzero(~masks.any((1, 2)))[:4]]
    small = 48
    sm = np.stack([cv2.resize(maps[i], (small, small), interpolation=cv2.INTER_AREA) for i in idx])
    sk = np.stack([cv2.resize(masks[i].view(np.uint8), (small, small), interpolation=cv2.INTER_NEAREST) for i in idx])
    sk = sk.astype(bool)
    t1 = time.perf_counter()
    ref = slow_exact_aupro(sm, sk)
    t_ref = time.perf_counter() - t1
    ours_small = aupro(sm, sk)
    log.info(
        "AUPRO on a %dx%dx%d subset: ours %.9f, slow exact definition %.9f (%.1f s), abs diff %.1e;"
        " papers' zsad variant on it %.6f",
        len(idx), small, small, ours_small, ref, t_ref, abs(ours_small - ref), aupro(sm, sk, variant="zsad"),
    )
    log.info(
        "AUPRO on the full workload: definition (mvtec) %.6f - papers' variant (zsad) %.6f = %+.6f"
        " (%.2f points)",
        ours_pro, ours_zsad, ours_pro - ours_zsad, 100 * (ours_pro - ours_zsad),
    )
    ok = all(abs(ours_rank[k] - theirs[k][0]) <= 1e-6 for k in ("auroc", "ap")) and abs(ours_small - ref) <= 1e-6
    ok = ok and abs(ours_rank["f1_max"] - theirs["f1_max"][0]) <= 1e-6
    log.info("agreement within 1e-6: %s", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
