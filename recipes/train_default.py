"""Recipe of the shipped offline default model (`dinov2-s-imgfocus`), and its zero-shot protocol.

    # zero-shot protocol: train on everything in shared/data except one category, evaluate on that one
    python recipes/train_default.py protocol --holdout tire --holdout cookie --out runs/protocol

    # the shipped head: train on everything, write it into the package
    python recipes/train_default.py ship --out visualad/pretrained/dinov2-s-imgfocus

The auxiliary set is every category of ``shared/data`` (MVTec AD hazelnut and transistor, MVTec 3D-AD tire,
the Lookout cookies, the Kvasir-SEG and CVC-ClinicDB polyps): their test splits with pixel masks, as the
paper trains on its auxiliary set's test split. A held-out category is removed by building the auxiliary
root from symbolic links to the other categories' folders.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from visualad import AnomalyDetector
from visualad.data.datasets import load_dataset
from visualad.weights.safe import load_safetensors, save_safetensors

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
CATEGORY_DIRS = {  # category name -> folder under shared/data
    "hazelnut": "mvtec_ad_reduced/hazelnut",
    "transistor": "mvtec_ad_reduced/transistor",
    "tire": "mvtec_3d_ad_tire_rgb/tire",
    "cookie": "lookout_cookies/cookie",
    "kvasir": "kvasir_seg/colon_polyp",
    "clinicdb": "cvc_clinicdb/colon_polyp",
}
LICENSES = {
    "mvtec_ad_reduced": "CC BY-NC-SA 4.0 (MVTec AD)",
    "mvtec_3d_ad_tire_rgb": "CC BY-NC-SA 4.0 (MVTec 3D-AD)",
    "lookout_cookies": "CC BY-SA 4.0 (AWS Lookout for Vision docs)",
    "kvasir_seg": "research and education use (Kvasir-SEG, Jha et al. 2020)",
    "cvc_clinicdb": "research use (CVC-ClinicDB, Bernal et al. 2015)",
}
# The recipe (see docs/model-card-dinov2-s-imgfocus.md for why): the paper's losses and optimiser.
RECIPE: Dict[str, Any] = {"image_size": 224, "epochs": 2, "seed": 111, "include_train_normals": True,
                          "sca_max_patches": 256}
HEAD_KEYS = ("layers", "sca_max_patches", "train_final_norm", "num_anchors")  # model config, not training


def aux_root(data: Path, exclude: List[str], into: Path) -> Path:
    """A dataset root of links to every category folder except the excluded ones."""
    for name, rel in CATEGORY_DIRS.items():
        if name in exclude:
            continue
        link = into / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((data / rel).resolve(), target_is_directory=True)
    return into


def train(data: Path, exclude: List[str], out: Path, recipe: Dict[str, Any]) -> AnomalyDetector:
    head = {k: recipe[k] for k in HEAD_KEYS if k in recipe}
    det = AnomalyDetector.from_backbone("dinov2-s-imgfocus", device="cpu", image_size=recipe["image_size"],
                                        seed=recipe["seed"], **head)
    with tempfile.TemporaryDirectory() as tmp:
        root = aux_root(data, exclude, Path(tmp))
        det.finetune(root, out_dir=out, epochs=recipe["epochs"], seed=recipe["seed"],
                     **{k: v for k, v in recipe.items() if k not in ("image_size", "epochs", "seed", *HEAD_KEYS)})
    return det


def evaluate(det: AnomalyDetector, data: Path, category: str, shots: int = 0) -> Dict[str, Any]:
    report = det.evaluate(data / CATEGORY_DIRS[category], shots=shots, progress=False)
    row = next(iter(report["classes"].values()))
    return {k: row[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}


def protocol(args: argparse.Namespace) -> None:
    results: Dict[str, Any] = {}
    recipe = {**RECIPE, **args.set}
    for category in args.holdout:
        t = time.time()
        untrained = AnomalyDetector.from_backbone("dinov2-s-imgfocus", device="cpu", image_size=recipe["image_size"],
                                                  seed=recipe["seed"])
        row = {"recipe": recipe, "untrained": evaluate(untrained, args.data, category)}
        det = train(args.data, [category], args.out / f"without-{category}", recipe)
        row["trained (zero-shot)"] = evaluate(det, args.data, category)
        results[category] = row
        print(category, json.dumps(row), f"{time.time() - t:.0f}s", flush=True)
    (args.out / "protocol.json").write_text(json.dumps(results, indent=2))


def ship(args: argparse.Namespace) -> None:
    recipe = {**RECIPE, **args.set}
    run = args.out.parent / f"{args.out.name}-run"
    det = train(args.data, [], run, recipe)
    used = sorted({s.category for s in load_dataset(args.data).samples})
    det.config.metadata.update({
        "name": "dinov2-s-imgfocus",
        "license": "non-commercial: trained on CC BY-NC-SA 4.0 data (MVTec AD, MVTec 3D-AD) and research-only "
                   "medical data (Kvasir-SEG, CVC-ClinicDB); see docs/model-card-dinov2-s-imgfocus.md",
        "license_id": "cc-by-nc-sa-4.0",
        "training_data": {"root": "shared/data", "categories": used, "licenses": LICENSES},
        "recipe": recipe,
    })
    det.save_pretrained(args.out)
    # ship the weights in fp16 (half the size; they are loaded into fp32 parameters)
    state = load_safetensors(args.out / "model.safetensors")
    save_safetensors({k: v.half() for k, v in state.items()}, args.out / "model.safetensors",
                     metadata={"format": "pt", "visualad_schema": "1", "stored_dtype": "float16"})
    shutil.copy(run / "training_report.json", args.out / "training_report.json")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["protocol", "ship"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--holdout", action="append", default=None, choices=sorted(CATEGORY_DIRS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (image_size, epochs, seed, or a TrainConfig field), JSON value")
    args = p.parse_args()
    args.set = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "protocol":
        args.holdout = args.holdout or ["tire", "cookie"]
        protocol(args)
    else:
        ship(args)


if __name__ == "__main__":
    main()
