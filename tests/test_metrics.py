"""visualad.metrics against scikit-learn and against slow, obviously-correct references."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from visualad import metrics
from visualad.metrics import aupro, image_metrics, pixel_metrics

EIGHT = np.ones((3, 3), dtype=int)  # 8-connectivity


# ------------------------------------------------------------------------------------------ references


def sk_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    p, r, _ = precision_recall_curve(labels, scores)
    denom = p + r
    f1 = np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1), 0.0)
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "f1_max": float(f1.max()),
    }


def regions_of(masks: np.ndarray) -> list:
    out = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=EIGHT)
        out += [(i, lab == r) for r in range(1, n + 1)]
    return out


def slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Definition: a threshold at every distinct score, PRO over FPR, trapezoid to exactly `limit`."""
    regions = regions_of(masks)
    neg = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        ys.append(np.mean([pred[i][r].mean() for i, r in regions]))
        xs.append((pred & neg).sum() / neg.sum())
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
            break
    return area / limit


def papers_cal_pro_score(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3):
    """The authors' recipe, loop for loop (scipy.ndimage.label with full connectivity instead of skimage)."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            lab, n = ndimage.label(mask, structure=EIGHT)
            for r in range(1, n + 1):
                region = lab == r
                pro.append(binary_amap[region].sum() / region.sum())
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fprs.append(fp_pixels / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    idx = fprs <= expect_fpr
    if idx.sum() < 2:
        return 0.0
    fprs = fprs[idx]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[idx])


def random_masks(rng: np.random.Generator, n: int, h: int, w: int, p: float = 0.25) -> np.ndarray:
    """Blobby random masks: thresholded smoothed noise, some images without any defect."""
    noise = ndimage.uniform_filter(rng.random((n, h, w)), size=(1, 3, 3))
    masks = noise > np.quantile(noise, 1 - p)
    masks[rng.random(n) < 0.3] = False
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, decimals: int, dtype=np.float32) -> np.ndarray:
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    return np.round(maps, decimals).astype(dtype)  # rounding makes ties


@pytest.fixture(params=[None, 7], ids=["one-chunk", "many-chunks"])
def chunk(request, monkeypatch):
    """Run every comparison once with the default chunking and once with tiny chunks (boundary handling)."""
    if request.param:
        monkeypatch.setattr(metrics, "_CHUNK", request.param)
    return request.param


# ------------------------------------------------------------------------------------- image metrics


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_image_metrics_match_sklearn_with_ties(seed, dtype, chunk):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    scores = np.round(rng.normal(size=n) + labels, int(rng.integers(0, 2))).astype(dtype)
    ours = image_metrics(scores, labels.astype(int))
    ref = sk_metrics(scores, labels)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k


def test_image_metrics_all_tied_and_tiny():
    assert image_metrics([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(sk_metrics(np.full(4, 0.5), np.array([0, 1, 0, 1])))
    assert image_metrics([0.1, 0.9], [False, True]) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=60).filter(
        lambda xs: 0 < sum(b for _, b in xs) < len(xs)
    )
)
def test_image_metrics_property(pairs):
    scores = np.array([s for s, _ in pairs], dtype=np.float64)
    labels = np.array([b for _, b in pairs])
    ours, ref = image_metrics(scores, labels), sk_metrics(scores, labels)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [False, False]])
def test_image_metrics_one_class_is_nan(labels):
    out = image_metrics(np.arange(len(labels), dtype=float), labels)
    assert set(out) == {"auroc", "ap", "f1_max"}
    assert all(math.isnan(v) for v in out.values())


def test_image_metrics_perfect_and_inverted():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    assert image_metrics(scores, [0, 0, 1, 1]) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    assert image_metrics(-scores, [0, 0, 1, 1])["auroc"] == 0.0


@pytest.mark.parametrize(
    "scores, labels",
    [
        (np.zeros(3), np.zeros(4)),
        (np.zeros((2, 2)), np.zeros((2, 2))),
        (np.array([0.1, np.nan]), np.array([0, 1])),
        (np.array([0.1, np.inf]), np.array([0, 1])),
        (np.array([-np.inf, 0.1]), np.array([0, 1])),
        (np.array([0.1, 0.2]), np.array([0, 2])),
        (np.array(["a", "b"]), np.array([0, 1])),
    ],
)
def test_image_metrics_bad_input_raises(scores, labels):
    with pytest.raises(ValueError):
        image_metrics(scores, labels)


# ------------------------------------------------------------------------------------- pixel metrics


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn_and_reference(seed, chunk):
    rng = np.random.default_rng(100 + seed)
    masks = random_masks(rng, 4, 12, 14)
    maps = random_maps(rng, masks, decimals=int(rng.integers(0, 2)))
    ours = pixel_metrics(maps, masks)
    ref = sk_metrics(maps.ravel(), masks.ravel())
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k
    assert ours["aupro"] == pytest.approx(slow_aupro(maps, masks), abs=1e-3)
    assert ours["aupro"] == pytest.approx(aupro(maps, masks), abs=1e-12)
    without = pixel_metrics(maps, masks, with_aupro=False)
    assert math.isnan(without["aupro"]) and without["auroc"] == ours["auroc"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_definition(seed, limit, chunk):
    rng = np.random.default_rng(200 + seed)
    masks = random_masks(rng, 3, 10, 11, p=float(rng.uniform(0.1, 0.5)))
    maps = random_maps(rng, masks, decimals=int(rng.integers(0, 3)), dtype=np.float64)
    if not masks.any():
        masks[0, 2:4, 3:6] = True
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(slow_aupro(maps, masks, limit), abs=1e-3)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(slow_aupro(maps, masks, limit), abs=1e-9)


def test_aupro_uses_8_connectivity_and_weights_regions_equally():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal: one region under 8-connectivity
    masks[0, 5:8, 5:8] = True  # a second, larger region
    maps = np.zeros((1, 8, 8))
    maps[0, 5:8, 5:8] = 1.0  # only the large region is found
    # PRO = 0.5 at FPR 0, then jumps to 1 at FPR 1: area up to 0.3 is 0.5 * 0.3 + small ramp
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-12)
    assert len(regions_of(masks)) == 2


@pytest.mark.parametrize("seed", range(4))
def test_aupro_zsad_matches_papers_recipe(seed):
    rng = np.random.default_rng(300 + seed)
    masks = random_masks(rng, 3, 9, 10)
    if not masks.any():
        masks[1, 1:4, 1:3] = True
    dtype = np.float32 if seed % 2 else np.float64
    maps = random_maps(rng, masks, decimals=3, dtype=dtype)
    if seed == 3:
        maps = np.exp(2 * maps).astype(dtype)  # skewed maps: few points survive the FPR cut
    assert aupro(maps, masks, variant="zsad") == pytest.approx(papers_cal_pro_score(masks, maps), abs=1e-9)


def test_aupro_zsad_differs_from_definition_and_is_not_rescaling_invariant():
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 4, 16, 16)
    maps = random_maps(rng, masks, decimals=4, dtype=np.float64)
    exp_maps = np.exp(3 * maps)
    assert aupro(exp_maps, masks) == pytest.approx(aupro(maps, masks), abs=1e-12)  # the definition: invariant
    assert abs(aupro(exp_maps, masks, variant="zsad") - aupro(maps, masks, variant="zsad")) > 1e-3


def test_perfect_predictor_is_one():
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 3, 10, 10)
    masks[0, :2, :2] = True
    maps = masks.astype(np.float32) + 0.01 * rng.random(masks.shape).astype(np.float32)
    out = pixel_metrics(maps, masks)
    assert out == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0, "aupro": 1.0}
    # the papers' variant degenerates here: every kept point has FPR 0, nothing to rescale (theirs: NaN)
    assert aupro(maps, masks, variant="zsad") == 0.0


def test_pixel_metrics_undefined_cases_are_nan():
    maps = np.random.default_rng(0).random((2, 5, 5))
    normal = pixel_metrics(maps, np.zeros((2, 5, 5), bool))
    assert all(math.isnan(v) for v in normal.values())
    anomalous = pixel_metrics(maps, np.ones((2, 5, 5), bool))
    assert all(math.isnan(v) for v in anomalous.values())
    assert math.isnan(aupro(maps, np.zeros((2, 5, 5), bool)))
    assert math.isnan(aupro(maps, np.zeros((2, 5, 5), bool), variant="zsad"))


def test_pixel_metrics_accepts_single_image_and_01_masks():
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 1, 10, 10)
    masks[0, 4:6, 4:6] = True
    maps = random_maps(rng, masks, 1)
    assert pixel_metrics(maps[0], masks[0].astype(np.uint8)) == pixel_metrics(maps, masks)


@pytest.mark.parametrize(
    "maps, masks",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool)),
        (np.zeros((2, 4, 4)), np.zeros((3, 4, 4), bool)),
        (np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4), bool)),
        (np.full((1, 2, 2), np.nan), np.array([[[0, 1], [1, 0]]], bool)),
        (np.zeros((1, 2, 2)), np.full((1, 2, 2), 255, np.uint8)),
    ],
)
def test_pixel_metrics_bad_input_raises(maps, masks):
    with pytest.raises(ValueError):
        pixel_metrics(maps, masks)
    with pytest.raises(ValueError):
        aupro(maps, masks)


@pytest.mark.parametrize("kwargs", [{"fpr_limit": 0.0}, {"fpr_limit": 1.5}, {"variant": "anomalib"}])
def test_aupro_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        aupro(np.zeros((1, 2, 2)), np.array([[[0, 1], [1, 0]]], bool), **kwargs)


def test_values_are_python_floats_in_unit_interval():
    rng = np.random.default_rng(11)
    masks = random_masks(rng, 3, 8, 8)
    masks[0, 0, 0] = True
    out = pixel_metrics(random_maps(rng, masks, 1), masks)
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in out.values())


def test_maps_of_different_sizes_equal_the_flattened_definition():
    """Maps scored at each image's own size come as lists; regions stay per image."""
    rng = np.random.default_rng(5)
    shapes = [(20, 30), (25, 18), (16, 16)]
    maps = [np.round(rng.random(s), 2).astype(np.float32) for s in shapes]
    masks = [np.zeros(s, bool) for s in shapes]
    masks[0][2:6, 3:9] = True
    masks[1][10:14, 4:7] = True
    masks[1][20:23, 10:16] = True
    for m, g in zip(maps, masks):
        m[g] += 0.3
    ours = pixel_metrics(maps, masks)
    flat_m = np.concatenate([m.ravel() for m in maps])
    flat_g = np.concatenate([g.ravel() for g in masks])
    assert ours["auroc"] == pytest.approx(roc_auc_score(flat_g, flat_m), abs=1e-6)
    assert ours["ap"] == pytest.approx(average_precision_score(flat_g, flat_m), abs=1e-6)
    # the definition, literally: regions per image, FPR over all negative pixels of all images
    regions = [(i, ndimage.label(g, structure=EIGHT)) for i, g in enumerate(masks)]
    regions = [(i, lab == r) for i, (lab, n) in regions for r in range(1, n + 1)]
    xs, ys = [0.0], [0.0]
    for t in np.unique(flat_m)[::-1]:
        ys.append(np.mean([(maps[i][r] >= t).mean() for i, r in regions]))
        xs.append(((flat_m >= t) & ~flat_g).sum() / (~flat_g).sum())
    xs, ys = np.array(xs), np.array(ys)
    k = np.searchsorted(xs, 0.3)
    y_lim = ys[k - 1] + (ys[k] - ys[k - 1]) * (0.3 - xs[k - 1]) / (xs[k] - xs[k - 1])
    expected = (np.trapezoid(ys[:k], xs[:k]) + (0.3 - xs[k - 1]) * (ys[k - 1] + y_lim) / 2) / 0.3
    assert ours["aupro"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        pixel_metrics([maps[0]], [masks[1]])
