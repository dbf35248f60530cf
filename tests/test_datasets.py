"""Dataset readers: every layout from tiny trees in tmp_path, plus the real trees in shared/data."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from PIL import Image

from visualad.data.datasets import Sample, detect_format, load_dataset, load_mask
from visualad.data.images import load_image
from visualad.errors import DatasetError, InvalidImageError


# ----------------------------------------------------------------------------- helpers


def _img(path: Path, hw: Tuple[int, int] = (8, 8), mode: str = "RGB", fill: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = hw
    Image.new(mode, (w, h), fill).save(path)
    return path


def _mask(path: Path, hw: Tuple[int, int] = (8, 8), box: Tuple[int, int, int, int] = (2, 2, 5, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(hw, dtype=np.uint8)
    y0, x0, y1, x1 = box
    arr[y0:y1, x0:x1] = 255
    Image.fromarray(arr, mode="L").save(path)
    return path


def _mvtec_category(cat_dir: Path, img_ext: str = ".png") -> None:
    for i in range(2):
        _img(cat_dir / "train" / "good" / f"{i:03d}{img_ext}")
        _img(cat_dir / "test" / "good" / f"{i:03d}{img_ext}")
    for defect in ("crack", "hole"):
        for i in range(2):
            _img(cat_dir / "test" / defect / f"{i:03d}{img_ext}")
            _mask(cat_dir / "ground_truth" / defect / f"{i:03d}_mask.png")


# ----------------------------------------------------------------------------- mvtec


def test_mvtec_multi_category(tmp_path: Path) -> None:
    _mvtec_category(tmp_path / "bottle")
    _mvtec_category(tmp_path / "cookie", img_ext=".jpg")
    ds = load_dataset(tmp_path)
    assert ds.format == "mvtec" and ds.categories == ["bottle", "cookie"]
    assert len(ds) == 12
    for s in ds.samples:
        if s.label == 0:
            assert s.defect == "good" and s.mask_path is None
        else:
            assert s.mask_path is not None
            assert s.mask_path.name == Path(s.image_path).stem + "_mask.png"
            assert s.mask_path.parent.name == s.defect
    assert ds.has_normals("cookie") and ds.has_masks("cookie")
    assert ds.notes == []
    assert [len(v) for v in ds.by_category().values()] == [6, 6]


def test_mvtec_single_category_root_and_train(tmp_path: Path) -> None:
    _mvtec_category(tmp_path / "bottle")
    ds = load_dataset(tmp_path / "bottle", format="mvtec")
    assert ds.categories == ["bottle"] and len(ds) == 6
    tr = load_dataset(tmp_path / "bottle", split="train")
    assert len(tr) == 2 and all(s.label == 0 and s.defect == "good" for s in tr.samples)
    assert all("/train/good/" in s.image_path.as_posix() for s in tr.samples)


def test_mvtec_pairs_by_stem_not_index(tmp_path: Path) -> None:
    """The authors pair by sorted index: a missing mask would shift every later pair."""
    cat = tmp_path / "c"
    _img(cat / "test" / "good" / "n.png")
    for stem in ("a", "b", "c"):
        _img(cat / "test" / "crack" / f"{stem}.png")
    _mask(cat / "ground_truth" / "crack" / "a_mask.png")
    _mask(cat / "ground_truth" / "crack" / "c_mask.png")
    ds = load_dataset(tmp_path)
    by_stem = {s.image_path.stem: s for s in ds.samples}
    assert by_stem["a"].mask_path.name == "a_mask.png"
    assert by_stem["b"].mask_path is None and by_stem["b"].mask_missing
    assert by_stem["c"].mask_path.name == "c_mask.png"
    assert any("without a mask" in n and "crack/b.png" in n for n in ds.notes)
    assert ds.has_masks("c")


def test_mvtec_btad_ok_and_plain_mask_names(tmp_path: Path) -> None:
    cat = tmp_path / "01"
    _img(cat / "test" / "ok" / "0000.bmp")
    _img(cat / "test" / "ko" / "0001.bmp")
    _mask(cat / "ground_truth" / "ko" / "0001.png")
    ds = load_dataset(tmp_path)
    labels = {s.image_path.name: (s.label, s.defect) for s in ds.samples}
    assert labels == {"0000.bmp": (0, "good"), "0001.bmp": (1, "ko")}
    assert [s.mask_path.name for s in ds.samples if s.label] == ["0001.png"]


def test_mvtec_skips_hidden_and_non_images_sorted(tmp_path: Path) -> None:
    cat = tmp_path / "c"
    for name in ("b.PNG", "a.JPEG", "c.webp"):
        _img(cat / "test" / "good" / name)
    (cat / "test" / "good" / "notes.txt").write_text("x")
    _img(cat / "test" / "good" / ".hidden.png")
    _img(cat / "test" / ".cache" / "x.png")
    ds = load_dataset(tmp_path)
    assert [s.image_path.name for s in ds.samples] == ["a.JPEG", "b.PNG", "c.webp"]
    assert any("no anomalous images" in n for n in ds.notes)


def test_multi_dataset_root_qualifies_duplicate_names(tmp_path: Path) -> None:
    _mvtec_category(tmp_path / "ds1" / "widget")
    _mvtec_category(tmp_path / "ds1" / "polyp")
    # polyp-like: anomalous only
    _img(tmp_path / "ds2" / "polyp" / "test" / "polyp" / "p.jpg")
    _mask(tmp_path / "ds2" / "polyp" / "ground_truth" / "polyp" / "p_mask.png")
    ds = load_dataset(tmp_path)
    assert ds.categories == ["ds1/polyp", "ds2/polyp", "widget"]
    assert not ds.has_normals("ds2/polyp") and ds.has_masks("ds2/polyp")
    assert "ds2/polyp: no normal images: image metrics undefined (NaN), pixel metrics only" in ds.notes
    with pytest.raises(KeyError):
        ds.has_normals("nope")


def test_symlink_loop_does_not_hang(tmp_path: Path) -> None:
    _mvtec_category(tmp_path / "c")
    os.symlink(tmp_path / "c" / "test", tmp_path / "c" / "test" / "good" / "loop")
    os.symlink("self", tmp_path / "c" / "test" / "crack" / "self")  # a -> a
    os.symlink(tmp_path, tmp_path / "c" / "test" / "up")  # would walk back to the root
    fold = tmp_path / "f"
    _img(fold / "good" / "n.png")
    _img(fold / "scratch" / "s.png")
    _mask(fold / "masks" / "scratch" / "s.png")
    os.symlink(fold / "masks", fold / "masks" / "scratch" / "again")
    ds = load_dataset(tmp_path / "c")
    assert len(ds) == 6 + 0  # 'up' holds no images of its own
    fs = load_dataset(fold, format="folder")
    assert [s.mask_path.name for s in fs.samples if s.label] == ["s.png"]


def test_a_broken_link_by_an_image_name_is_a_sample_that_fails_by_name(tmp_path: Path) -> None:
    """Not dropped (the metrics would silently cover fewer images): listed, and reading it names it."""
    _mvtec_category(tmp_path / "c")
    crack = tmp_path / "c" / "test" / "crack"
    os.symlink(tmp_path / "gone.png", crack / "zz_dangling.png")
    os.symlink("zz_loop.png", crack / "zz_loop.png")
    ds = load_dataset(tmp_path / "c")
    assert len(ds) == 6 + 2
    for name, reason in [("zz_dangling.png", "file not found"), ("zz_loop.png", "cannot access file")]:
        [sample] = [s for s in ds.samples if s.image_path.name == name]
        with pytest.raises(InvalidImageError, match=reason):
            load_image(sample.image_path)


# ----------------------------------------------------------------------------- visa


def test_visa_csv(tmp_path: Path) -> None:
    _img(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    _img(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0001.JPG")
    _img(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "0002.JPG")
    _mask(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "0002.png")
    csv = tmp_path / "split_csv" / "1cls.csv"
    csv.parent.mkdir()
    csv.write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/0002.JPG,candle/Data/Masks/Anomaly/0002.png\n"
    )
    ds = load_dataset(tmp_path)
    assert ds.format == "visa" and ds.categories == ["candle"]
    assert [(s.image_path.name, s.label, s.defect) for s in ds.samples] == [
        ("0000.JPG", 0, "good"), ("0002.JPG", 1, "anomaly")]
    assert ds.samples[1].mask_path.name == "0002.png"
    tr = load_dataset(tmp_path, split="train")
    assert [s.image_path.name for s in tr.samples] == ["0001.JPG"]


def test_visa_refuses_traversal(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _img(tmp_path / "outside.png")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\ncandle,test,normal,../outside.png,\n")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        load_dataset(root)


# ----------------------------------------------------------------------------- meta.json


def _meta_tree(root: Path) -> None:
    _img(root / "screw" / "test" / "good" / "000.png")
    _img(root / "screw" / "test" / "scratch" / "001.png")
    _mask(root / "screw" / "ground_truth" / "scratch" / "001_mask.png")
    _img(root / "screw" / "train" / "good" / "002.png")


def _entry(img: str, mask: str = "", cls: str = "screw", specie: str = "good", anomaly: int = 0) -> dict:
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}


def test_meta_json_capitalised_keys(tmp_path: Path) -> None:
    _meta_tree(tmp_path)
    meta = {
        "Train": {"screw": [_entry("screw/train/good/002.png")]},
        "Test": {"screw": [
            _entry("screw/test/good/000.png"),
            _entry("screw/test/scratch/001.png", "screw/ground_truth/scratch/001_mask.png", specie="scratch", anomaly=1),
            _entry(str(tmp_path / "screw/test/scratch/001.png"), "", specie="scratch", anomaly=1),  # absolute, inside
        ]},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path)
    assert ds.format == "meta" and ds.categories == ["screw"]
    assert [(s.label, s.defect, s.mask_path is not None) for s in ds.samples] == [
        (0, "good", False), (1, "scratch", True), (1, "scratch", False)]
    assert ds.samples[2].mask_missing
    assert any("1 of 2 anomalous" in n for n in ds.notes)
    assert len(load_dataset(tmp_path, split="train")) == 1


def test_meta_missing_split_lists_keys(tmp_path: Path) -> None:
    _meta_tree(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"Test": {"screw": [_entry("screw/test/good/000.png")]}}))
    with pytest.raises(DatasetError, match=r"keys present: \['Test'\]"):
        load_dataset(tmp_path, split="train")


@pytest.mark.parametrize("field", ["img_path", "mask_path"])
def test_meta_refuses_dotdot(tmp_path: Path, field: str) -> None:
    root = tmp_path / "root"
    _meta_tree(root)
    _img(tmp_path / "outside.png")
    e = _entry("screw/test/scratch/001.png", "screw/ground_truth/scratch/001_mask.png", specie="scratch", anomaly=1)
    e[field] = "../outside.png"
    (root / "meta.json").write_text(json.dumps({"test": {"screw": [e]}}))
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    msg = str(info.value)
    assert "outside the dataset root" in msg and "meta.json['test']['screw'][0]" in msg
    assert str(root.resolve()) in msg and field in msg


def test_meta_refuses_absolute_outside_and_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _meta_tree(root)
    outside = _img(tmp_path / "outside.png")
    (root / "meta.json").write_text(json.dumps({"test": {"screw": [_entry(str(outside))]}}))
    with pytest.raises(DatasetError, match="outside the dataset root"):
        load_dataset(root)
    os.symlink(outside, root / "link.png")
    (root / "meta.json").write_text(json.dumps({"test": {"screw": [_entry("link.png")]}}))
    with pytest.raises(DatasetError, match="outside the dataset root"):
        load_dataset(root)


def test_meta_missing_file_and_bad_label(tmp_path: Path) -> None:
    _meta_tree(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"test": {"screw": [_entry("screw/nope.png")]}}))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"test": {"screw": [_entry("screw/test/good/000.png", anomaly=2)]}}))
    with pytest.raises(DatasetError, match="'anomaly' must be 0 or 1"):
        load_dataset(tmp_path)


# ----------------------------------------------------------------------------- plain folders


def test_folder_single_category(tmp_path: Path) -> None:
    root = tmp_path / "pcb"
    _img(root / "good" / "g1.png")
    _img(root / "scratch" / "s1.jpg")
    _img(root / "scratch" / "s2.jpg")
    _img(root / "dent" / "d1.png")
    _mask(root / "masks" / "s1.png")
    _mask(root / "masks" / "dent" / "d1_mask.png")
    ds = load_dataset(root)
    assert ds.format == "folder" and ds.categories == ["pcb"]
    got = {s.image_path.name: (s.label, s.defect, s.mask_path.name if s.mask_path else None) for s in ds.samples}
    assert got == {"g1.png": (0, "good", None), "s1.jpg": (1, "scratch", "s1.png"),
                   "s2.jpg": (1, "scratch", None), "d1.png": (1, "dent", "d1_mask.png")}
    assert any("s2.jpg" in n for n in ds.notes)


def test_folder_nested_masks_serve_their_defect_only(tmp_path: Path) -> None:
    root = tmp_path / "part"
    _img(root / "good" / "000.png")
    _img(root / "dent" / "000.png")
    _img(root / "scratch" / "000.png")
    _mask(root / "masks" / "dent" / "000_mask.png")
    ds = load_dataset(root, format="folder")
    got = {s.defect: s.mask_path for s in ds.samples if s.label}
    assert got["dent"].parent.name == "dent" and got["scratch"] is None
    _mask(root / "masks" / "000.png")  # a flat mask now fits both defects' 000.png ...
    _mask(root / "masks" / "scratch" / "000.png")  # ... but scratch has its own
    ds = load_dataset(root, format="folder")
    assert {s.defect: s.mask_path.parent.name for s in ds.samples if s.label} == {"dent": "dent", "scratch": "scratch"}
    (root / "masks" / "scratch" / "000.png").unlink()
    (root / "masks" / "dent" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match="matches several images"):
        load_dataset(root, format="folder")


def test_folder_several_categories(tmp_path: Path) -> None:
    for cat in ("a", "b"):
        _img(tmp_path / cat / "good" / "g.png")
        _img(tmp_path / cat / "bad" / "x.png")
    (tmp_path / "docs").mkdir()
    ds = load_dataset(tmp_path)
    assert ds.format == "folder" and ds.categories == ["a", "b"]
    assert any("no masks" in n for n in ds.notes)
    assert any("ignored" in n and "docs" in n for n in ds.notes)
    assert not ds.has_masks("a")


def test_auto_refuses_unknown_layout(tmp_path: Path) -> None:
    _img(tmp_path / "x" / "y.png")
    with pytest.raises(DatasetError, match="accepted layouts"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError):
        detect_format(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_dataset(tmp_path, format="coco")


# ----------------------------------------------------------------------------- masks


def test_load_mask_binarises_and_resizes(tmp_path: Path) -> None:
    img = _img(tmp_path / "i.png", (8, 8))
    m1 = tmp_path / "m1.png"
    arr = np.zeros((8, 8), dtype=bool)
    arr[0:4, 0:4] = True
    Image.fromarray(arr).convert("1").save(m1)  # mode "1" like mvtec_ad_reduced
    assert Image.open(m1).mode == "1"
    s = Sample(img, 1, m1, "c", "d")
    m = load_mask(s, image_size=(8, 8))
    assert m.dtype == bool and m.shape == (8, 8) and m.sum() == 16
    assert load_mask(s).sum() == 16  # image size read from the header
    up = load_mask(s, size=(16, 32), image_size=(8, 8))
    # bilinear + '> 127' (the authors' recipe): the square grows 2x, its border pixel may go either way
    assert up.shape == (16, 32) and up[:7, :15].all() and not up[9:, :].any() and not up[:, 17:].any()
    grey = tmp_path / "m2.png"
    Image.fromarray(np.full((8, 8), 1, np.uint8), mode="L").save(grey)  # 1 > 0 counts as defect
    assert load_mask(Sample(img, 1, grey, "c", "d"), image_size=(8, 8)).all()
    z = load_mask(Sample(img, 0, None, "c", "good"), size=(4, 5), image_size=(8, 8))
    assert z.shape == (4, 5) and z.dtype == bool and not z.any()
    assert load_mask(Sample(img, 0, None, "c", "good")).shape == (8, 8)


def test_load_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    img = _img(tmp_path / "img.png", (8, 10))
    mask = _mask(tmp_path / "img_mask.png", (8, 8))
    with pytest.raises(DatasetError) as info:
        load_mask(Sample(img, 1, mask, "c", "d"), image_size=(8, 10))
    msg = str(info.value)
    assert str(img) in msg and str(mask) in msg and "8x8" in msg and "8x10" in msg


# ----------------------------------------------------------------------------- real data


def test_real_mvtec_ad_reduced(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "mvtec_ad_reduced")
    assert ds.format == "mvtec" and ds.categories == ["hazelnut", "transistor"]
    for samples in ds.by_category().values():
        assert len(samples) == 10
        assert sum(s.label == 0 for s in samples) == 2
        anomalous = [s for s in samples if s.label == 1]
        assert len(anomalous) == 8 and all(s.mask_path is not None for s in anomalous)
        for s in anomalous:
            m = load_mask(s)
            assert m.shape == (256, 256) and m.any()
    assert ds.notes == []
    train = load_dataset(shared_data / "mvtec_ad_reduced", split="train")
    assert len(train) == 100 and {s.label for s in train.samples} == {0}


def test_real_whole_root(shared_data: Path) -> None:
    ds = load_dataset(shared_data)
    assert ds.format == "mvtec"
    assert ds.categories == ["cookie", "cvc_clinicdb/colon_polyp", "hazelnut",
                             "kvasir_seg/colon_polyp", "tire", "transistor"]
    for polyp in ("kvasir_seg/colon_polyp", "cvc_clinicdb/colon_polyp"):
        assert not ds.has_normals(polyp) and ds.has_masks(polyp)
        assert f"{polyp}: no normal images: image metrics undefined (NaN), pixel metrics only" in ds.notes
    counts = {c: (sum(s.label == 0 for s in v), sum(s.label for v2 in [v] for s in v2))
              for c, v in ds.by_category().items()}
    assert counts["tire"] == (12, 35) and counts["cookie"] == (21, 32)
    assert all(not s.mask_missing for s in ds.samples)
    cookie = [s for s in ds.samples if s.category == "cookie" and s.label == 1]
    assert all(s.image_path.suffix == ".jpg" and s.mask_path.name == s.image_path.stem + "_mask.png" for s in cookie)
