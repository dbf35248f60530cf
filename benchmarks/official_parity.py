"""Parity of a converted official checkpoint with a literal re-implementation of the authors' inference.

Converts the checkpoint with ``visualad.weights.official.convert_official``, loads the directory with
``AnomalyDetector.from_pretrained`` and compares the smoothed fused map and the image score with
``tests/reference_visualad.py`` on N random images at the checkpoint's input size (518 px).

    python benchmarks/official_parity.py --checkpoint CLIP.pth --backbone-weights open_clip_model.safetensors
    python benchmarks/official_parity.py --synthetic            # random ViT-L/14@336 weights, authors' layout
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from reference_visualad import reference_predict  # noqa: E402

from visualad import AnomalyDetector  # noqa: E402
from visualad.weights.official import convert_official, read_official_checkpoint  # noqa: E402


def build_tower(model: str, quick_gelu: bool) -> torch.nn.Module:
    """The open_clip image tower the reference runs on (random weights until loaded)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(model)
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"],
                               quick_gelu=quick_gelu or bool(cfg.get("quick_gelu", False))).eval()


def synthetic_checkpoint(dim: int = 1024, layers=(6, 12, 18, 24), anchors: int = 4, max_patches: int = 1536,
                         image_size: int = 518, seed: int = 0) -> dict:
    """Random tensors in the authors' checkpoint layout (method doc §6.5), at the real sizes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    s = dim ** -0.5
    cross, transforms = {}, {}
    for layer in layers:
        p = f"layer_attentions.layer_{layer}."
        cross.update({
            p + "anchor_queries": rnd(anchors, dim), p + "pos_encoding": rnd(1, max_patches, dim, scale=0.3),
            p + "q_proj.weight": rnd(dim, dim, scale=s), p + "k_proj.weight": rnd(dim, dim, scale=s),
            p + "v_proj.weight": rnd(dim, dim, scale=s),
            p + "q_norm.weight": rnd(dim, scale=0.1, offset=1.0), p + "q_norm.bias": rnd(dim, scale=0.1),
            p + "k_norm.weight": rnd(dim, scale=0.1, offset=1.0), p + "k_norm.bias": rnd(dim, scale=0.1),
            p + "gate.0.weight": rnd(anchors, dim, scale=s), p + "gate.0.bias": rnd(anchors, scale=0.5),
            p + "out_proj.weight": rnd(dim, dim, scale=s), p + "out_proj.bias": rnd(dim, scale=0.1),
            p + "res_scale": rnd(1, scale=0.1, offset=0.5),
        })
        transforms[f"layer_{layer}"] = {"mlp.0.weight": rnd(dim, dim, scale=s), "mlp.0.bias": rnd(dim, scale=0.1),
                                        "mlp.3.weight": rnd(dim, dim, scale=s), "mlp.3.bias": rnd(dim, scale=0.1)}
    return {
        "anomaly_token": rnd(dim, scale=0.5), "normal_token": rnd(dim, scale=0.5),
        "ln_post_weight": rnd(dim, scale=0.3, offset=1.0), "ln_post_bias": rnd(dim, scale=0.3),
        "features_list": list(layers), "image_size": image_size, "epoch": 1, "backbone": "ViT-L/14@336px",
        "layer_transforms": transforms, "transform_type": "mlp", "cross_attn": cross,
        "cross_attn_config": {"num_anchors": anchors, "dropout": 0.1, "res_scale_init": 0.01},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="the authors' CLIP.pth")
    src.add_argument("--synthetic", action="store_true", help="random ViT-L/14@336 tower and checkpoint")
    ap.add_argument("--backbone-weights", type=Path,
                    help="safetensors of the open_clip model (visual.* keys) or of its image tower")
    ap.add_argument("--backbone", default="clip-l", help="visualad backbone name (default clip-l)")
    ap.add_argument("--open-clip-model", default="ViT-L-14-336", help="open_clip config of the reference tower")
    ap.add_argument("--no-quick-gelu", action="store_true", help="the reference tower uses plain GELU")
    ap.add_argument("--load-final-norm", action="store_true", help="use the checkpoint's ln_post (not the default)")
    ap.add_argument("-n", "--num-images", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="where to convert (default: a temporary directory, removed)")
    args = ap.parse_args(argv)
    if args.checkpoint and not args.backbone_weights:
        ap.error("--checkpoint needs --backbone-weights (a local file: this script never downloads)")

    torch.manual_seed(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="visualad-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        tower = build_tower(args.open_clip_model, quick_gelu=not args.no_quick_gelu)
        if args.synthetic:
            from safetensors.torch import save_file

            ckpt_path = work / "CLIP.pth"
            torch.save(synthetic_checkpoint(seed=args.seed), ckpt_path)
            bb_path = work / "tower.safetensors"
            save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(bb_path))
        else:
            from safetensors.torch import load_file

            ckpt_path, bb_path = args.checkpoint, args.backbone_weights
            sd = load_file(str(bb_path))
            if any(k.startswith("visual.") for k in sd):
                sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
            tower.load_state_dict(sd, strict=True)
            del sd
        ckpt = read_official_checkpoint(ckpt_path)
        print(f"setup {time.perf_counter() - t0:.1f}s", flush=True)

        t = time.perf_counter()
        out = convert_official(ckpt_path, work / "converted", backbone=args.backbone, backbone_weights=bb_path,
                               load_final_norm=args.load_final_norm)
        det = AnomalyDetector.from_pretrained(out, device="cpu", dtype="fp32")
        size = det.config.image_size
        print(f"convert + load {time.perf_counter() - t:.1f}s; input {size} px, layers {list(det.config.layers)}, "
              f"ln_post from {'checkpoint' if args.load_final_norm else 'backbone'}", flush=True)

        gen = torch.Generator().manual_seed(args.seed + 1)
        map_diff, score_diff, t_ours, t_ref, n = 0.0, 0.0, 0.0, 0.0, 0
        rows = []
        while n < args.num_images:
            b = min(args.batch_size, args.num_images - n)
            x = torch.randn(b, 3, size, size, generator=gen)
            t = time.perf_counter()
            maps, scores = det.model.predict_maps(x)
            t_ours += time.perf_counter() - t
            t = time.perf_counter()
            ref_maps, ref_scores = reference_predict(ckpt, tower, x, use_checkpoint_ln_post=args.load_final_norm,
                                                     sigma=det.config.sigma, topk_ratio=det.config.topk_ratio)
            t_ref += time.perf_counter() - t
            md = float(np.abs(maps.numpy() - ref_maps).max())
            sd_ = float(np.abs(scores.numpy() - ref_scores).max())
            map_diff, score_diff = max(map_diff, md), max(score_diff, sd_)
            for i in range(b):
                rows.append({"score": float(scores[i]), "ref_score": float(ref_scores[i]),
                             "map_range": [float(ref_maps[i].min()), float(ref_maps[i].max())]})
            n += b
        print(json.dumps({"images": n, "image_size": size, "max_abs_diff_smoothed_map": map_diff,
                          "max_abs_diff_score": score_diff, "seconds_ours": round(t_ours, 1),
                          "seconds_reference": round(t_ref, 1), "per_image": rows}, indent=2))
        return 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
