"""Few-shot benchmark: zero-shot vs references-only vs fused, then memory and time with 16 references.

    python benchmarks/fewshot.py [--data ../shared/data] [--shots 1 4 16] [--heads runs/protocol] [--skip-speed]
                                 [--bootstrap 100] [--feature backbone|patches|saf]

Uses the trained default model when one ships (AnomalyDetector.from_pretrained()), else the untrained head on
the offline DINOv2-S/14 (from_backbone("dinov2-s-imgfocus")); it prints which. References are drawn from each
category's train/good exactly as ``visualad eval --shots K`` draws them (seed 42), never from the test split.
Maps are scored at the model's size (the papers' protocol). Prints Markdown tables for docs/few-shot.md.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector, fewshot, metrics  # noqa: E402
from visualad.data import images as imio  # noqa: E402
from visualad.data.datasets import load_dataset, load_mask  # noqa: E402
from visualad.tasks.evaluate import _reference_images  # noqa: E402

CATEGORIES = {"tire": "mvtec_3d_ad_tire_rgb", "cookie": "lookout_cookies", "hazelnut": "mvtec_ad_reduced",
              "transistor": "mvtec_ad_reduced"}


def load_detector(image_size: "int | None", heads: "Path | None" = None,
                  category: "str | None" = None) -> "tuple[AnomalyDetector, str]":
    """The zero-shot head: ``heads/without-<category>`` (trained without that category: the honest protocol),
    else the shipped default model, else the untrained head."""
    if heads is not None and category is not None and (heads / f"without-{category}").is_dir():
        path = heads / f"without-{category}"
        return AnomalyDetector.from_pretrained(path, device="cpu", image_size=image_size), f"head {path.name}"
    try:
        return AnomalyDetector.from_pretrained(device="cpu", image_size=image_size), "trained default model"
    except Exception as exc:  # noqa: BLE001 - any failure means: no trained default model ships yet
        det = AnomalyDetector.from_backbone("dinov2-s-imgfocus", device="cpu", image_size=image_size)
        return det, f"untrained head on dinov2-s-imgfocus (no trained default model: {type(exc).__name__})"


def prepared(det: AnomalyDetector, paths: List[Path]) -> List[np.ndarray]:
    return [imio.resize_to_square(imio.load_image(p).array, det.config.image_size) for p in paths]


def scored(maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[image AUROC, pixel AUROC, AUPRO] of model-size maps and image scores."""
    pix = metrics.pixel_metrics(maps, masks)
    img = metrics.image_metrics(scores, labels)
    return np.array([img["auroc"], pix["auroc"], pix["aupro"]])


def run_category(det: AnomalyDetector, root: Path, category: str, shots: List[int], weights: List[float],
                 batch: int = 8, keep: "tuple[float, ...]" = (),
                 feature: str = fewshot.DEFAULT_FEATURE) -> Dict[int, Dict[str, Any]]:
    """Per K: metrics of the fused rule for every few-shot weight w (w = 0: the zero-shot map, w = 1: the
    references-only map, both up to an affine map, to which all metrics are invariant). The maps and scores
    of the weights in ``keep`` are kept (``row["maps"][w]``, with ``masks`` and ``labels``) for the
    bootstrap."""
    dataset = root / CATEGORIES[category]
    test = [s for s in load_dataset(dataset).samples if s.category == category]
    train = load_dataset(dataset, split="train")
    size = det.config.image_size
    arrays = prepared(det, [s.image_path for s in test])
    masks = np.stack([load_mask(s, size=(size, size)) for s in test])
    labels = np.array([s.label for s in test])
    out = {}
    for k in shots:
        refs = _reference_images(train, category, k, 42)
        det.set_references(refs, feature=feature)
        bank = det.references
        zero, few = [], []
        for s in range(0, len(arrays), batch):
            with torch.inference_mode(), det._autocast():
                images = det._to_batch(arrays[s:s + batch])
                fwd = det.model(images)
                zero.append(fwd.layer_maps.float().sum(dim=1))
                few.append(bank.few_shot_grid(det.model, images, fwd))
        det.clear_references()
        zero_grid, few_grid = torch.cat(zero), torch.cat(few)
        row: Dict[str, Any] = {"k": len(refs), "maps": {}, "masks": masks, "labels": labels}
        for w in weights:
            bank.weights = (1.0 - w, w)
            with torch.inference_mode():
                grid = bank.fuse_grid(zero_grid, few_grid)
                maps = det.model.grid_to_map(grid)
                scores = det.model.image_score(maps)
            row[w] = scored(maps.numpy(), scores.numpy(), masks, labels)
            if w in keep:
                row["maps"][w] = (maps.numpy(), scores.numpy())
        out[k] = row
        print(f"# {category} K={k} ({len(refs)} refs): " + "  ".join(
            f"w={w} {np.round(row[w], 3).tolist()}" for w in weights), file=sys.stderr, flush=True)
    return out


def table(results: Dict[str, Dict[int, Dict]], shots: List[int], parts: Dict[str, float]) -> str:
    """Zero-shot, references-only and fused rows per K, per category and the mean."""
    cats = list(results)
    lines = ["| K | part | " + " | ".join(f"{c} I / P / PRO" for c in cats) + " | **mean I / P / PRO** |",
             "|---|---|" + "---|" * (len(cats) + 1)]
    for k in shots:
        for name, w in parts.items():
            cells = []
            for c in cats:
                r = results[c][k]
                note = f" (K={r['k']})" if r["k"] != k else ""
                cells.append(" / ".join(f"{v:.3f}" for v in r[w]) + note)
            mean = np.mean([results[c][k][w] for c in cats], axis=0)
            lines.append(f"| {k} | {name} | " + " | ".join(cells) + " | **" + " / ".join(f"{v:.3f}" for v in mean)
                         + "** |")
    return "\n".join(lines)


def sweep(results: Dict[str, Dict[int, Dict]], shots: List[int], weights: List[float]) -> str:
    """Mean over the categories of each metric, per K and few-shot weight w."""
    lines = ["| w (few-shot weight) | " + " | ".join(f"K={k} I / P / PRO" for k in shots) + " | all K |",
             "|---|" + "---|" * (len(shots) + 1)]
    for w in weights:
        means = [np.mean([results[c][k][w] for c in results], axis=0) for k in shots]
        lines.append(f"| {w:g} | " + " | ".join(" / ".join(f"{v:.3f}" for v in m) for m in means)
                     + f" | {np.mean(means):.4f} |")
    return "\n".join(lines)


def bootstrap(results: Dict[str, Dict[int, Dict]], shots: List[int], pairs: Dict[str, "tuple[float, float]"],
              n: int, seed: int = 0) -> str:
    """Paired bootstrap over test images, stratified by category and label: the 95% interval of the
    difference in the mean of all metrics (categories x K x I / P / PRO) between two weights. Why: the test
    splits are small (hazelnut and transistor: 2 normal and 8 anomalous images), so a difference of a few
    thousandths may be noise."""
    rng = np.random.default_rng(seed)
    weights = sorted({w for pair in pairs.values() for w in pair})

    def means(pick: Dict[str, np.ndarray]) -> Dict[float, float]:
        vals: Dict[float, List[np.ndarray]] = {w: [] for w in weights}
        for c, by_k in results.items():
            for k in shots:
                r, i = by_k[k], pick[c]
                for w in weights:
                    maps, scores = r["maps"][w]
                    vals[w].append(scored(maps[i], scores[i], r["masks"][i], r["labels"][i]))
        return {w: float(np.mean(v)) for w, v in vals.items()}

    labels = {c: by_k[shots[0]]["labels"] for c, by_k in results.items()}
    point = means({c: np.arange(len(lab)) for c, lab in labels.items()})
    draws = []
    for _ in range(n):
        pick = {c: np.concatenate([rng.choice(np.flatnonzero(lab == v), int((lab == v).sum())) for v in (0, 1)])
                for c, lab in labels.items()}
        m = means(pick)
        draws.append([m[a] - m[b] for a, b in pairs.values()])
    d = np.array(draws)
    lines = ["| difference of the all-metric mean | point | bootstrap mean | 95% interval | share of draws > 0 |",
             "|---|---|---|---|---|"]
    for j, (name, (a, b)) in enumerate(pairs.items()):
        lo, hi = np.percentile(d[:, j], [2.5, 97.5])
        lines.append(f"| {name} | {point[a] - point[b]:+.4f} | {d[:, j].mean():+.4f} | [{lo:+.4f}, {hi:+.4f}] "
                     f"| {np.mean(d[:, j] > 0):.2f} |")
    return "\n".join(lines) + f"\n\n({n} draws, seed {seed})"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def speed(root: Path, n_images: int = 16, repeats: int = 2) -> str:
    """Bank size, peak-RSS delta and time per image with 16 references at the model's default size."""
    det, _ = load_detector(None)
    category = "hazelnut"  # 50 train/good images: 16 real references
    dataset = root / CATEGORIES[category]
    test = [s.image_path for s in load_dataset(dataset).samples if s.category == category]
    test = (test * ((n_images + len(test) - 1) // len(test)))[:n_images]
    refs = _reference_images(load_dataset(dataset, split="train"), category, 16, 42)

    def timed() -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _r in det.predict_iter(test, batch_size=8, at_model_size=True):
                pass
            best = min(best, time.perf_counter() - t0)
        return best / len(test)

    list(det.predict_iter(test[:8], batch_size=8))  # warm-up
    t_zero = timed()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    det.set_references(refs)
    t_build = time.perf_counter() - t0
    t_few = timed()
    rss1 = rss_mb()
    bank = det.references
    det.set_references(refs, feature="patches")  # the single-forward alternative, for the price of the default
    t_patches = timed()
    return "\n".join([
        f"| image size | {det.config.image_size} px (grid {det.model.grid}x{det.model.grid}) |",
        "|---|---|",
        f"| references | {bank.shots} ({category}), layers {list(bank.layers)}, {bank.feature} features |",
        f"| bank | {sum(bank.n_patches.values())} patches, {bank.nbytes:,} bytes ({bank.nbytes / 2**20:.1f} MiB) |",
        f"| peak RSS delta (build + predict) | {rss1 - rss0:.0f} MiB |",
        f"| build time (16 refs) | {t_build:.2f} s |",
        f"| time per image, zero-shot | {t_zero:.3f} s |",
        f"| time per image, few-shot fused | {t_few:.3f} s ({100 * (t_few / t_zero - 1):+.0f}%) |",
        f"| time per image, few-shot fused, feature='patches' | {t_patches:.3f} s "
        f"({100 * (t_patches / t_zero - 1):+.0f}%) |",
        f"| threads | {torch.get_num_threads()} |",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--image-size", type=int, default=None, help="default: the model's own size")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    ap.add_argument("--heads", type=Path, default=None,
                    help="folder of heads trained without one category each (recipes/train_default.py protocol "
                         "--out HEADS): HEADS/without-<category> is used for that category")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                    help="few-shot weights w of the fused rule to measure (0 and 1 are the two parts)")
    ap.add_argument("--feature", choices=fewshot.FEATURES, default=fewshot.DEFAULT_FEATURE,
                    help="patch features of the memory bank (set_references(feature=...))")
    ap.add_argument("--bootstrap", type=int, default=0, metavar="N",
                    help="N paired bootstrap draws over test images: 95%% interval of fused minus each part")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-table", action="store_true")
    args = ap.parse_args()
    print(f"command: python benchmarks/fewshot.py {' '.join(sys.argv[1:])}")
    if not args.skip_speed:  # first: the peak-RSS delta is only meaningful in a fresh process
        print("\n" + speed(args.data) + "\n", flush=True)
    if not args.skip_table:
        default_w = fewshot.DEFAULT_WEIGHTS[1]
        weights = sorted(set(args.weights) | {0.0, 1.0, default_w})
        t0 = time.perf_counter()
        results = {}
        for c in args.categories:
            det, which = load_detector(args.image_size, args.heads, c)
            print(f"{c}: {which}; image size {det.config.image_size}; few-shot layers "
                  f"{list(fewshot.default_layers(det.config.layers))}; torch threads {torch.get_num_threads()}; "
                  f"dtype {det.dtype}; bank features {args.feature}", flush=True)
            keep = (0.0, default_w, 1.0) if args.bootstrap else ()
            results[c] = run_category(det, args.data, c, args.shots, weights, keep=keep, feature=args.feature)
        print("\nImage AUROC / pixel AUROC / AUPRO (maps at model size)\n")
        print(table(results, args.shots, {"zero_shot": 0.0, "few_shot": 1.0, f"fused (w={default_w:g})": default_w}))
        print("\nFused rule, mean over the categories, per few-shot weight w\n")
        print(sweep(results, args.shots, weights))
        if args.bootstrap:
            print(f"\nPaired bootstrap over test images (fused w={default_w:g})\n")
            print(bootstrap(results, args.shots, {"fused - references only": (default_w, 1.0),
                                                  "fused - zero-shot": (default_w, 0.0)}, args.bootstrap))
        print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
