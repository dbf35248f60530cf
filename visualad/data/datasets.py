"""Reading anomaly-detection datasets from disk into one flat list of :class:`Sample`.

Why one module: evaluation, calibration, few-shot references and finetuning all need the same
thing, "which images, which label, which mask, which class", whatever the tree looks like.
Only paths are collected here; images and masks are opened lazily (:func:`load_mask`).

Accepted layouts (``format=``):

``"mvtec"``
    ``<root>/<cat>/<split>/<defect>/<image>`` with masks in
    ``<root>/<cat>/ground_truth/<defect>/<stem>_mask.png`` (``<stem>.png`` and other image
    extensions are accepted too). ``good`` (and BTAD's ``ok``) is the normal folder; its samples get
    ``defect="good"``. ``root`` may also be a single category folder (it has a ``test/`` or ``train/``
    child; the category is the folder name), or a folder of several MVTec-style datasets
    (``<root>/<dataset>/<cat>/test/...``); category names are kept as found and only names that
    occur in more than one dataset are qualified as ``"<dataset>/<cat>"``.
    Images and masks are paired **by stem**, never by sorted index (the authors' generator pairs by
    index, which silently mismatches when one file is missing). An anomalous image without a mask is
    kept with ``mask_path=None`` and a note; :attr:`Sample.mask_missing` tells pixel metrics to skip it.
    ``split="train"`` reads only the normal folder(s) of ``train/``: it is for few-shot references
    and calibration.

``"visa"``
    ``<root>/split_csv/1cls.csv`` (columns ``object, split, label, image, mask``; label
    ``normal``/``anomaly``; paths relative to the root). VisA has no defect names: anomalous
    samples get ``defect="anomaly"``.

``"meta"``
    AnomalyCLIP/VisualAD ``<root>/meta.json`` (``{"train"|"Train": {cls: [entry]}, "test"|"Test": ...}``).
    Relative paths are joined to the root; absolute paths are allowed only inside the root; any path
    that resolves (``..``, symlinks) outside the root raises :class:`DatasetError`. ``mask_path`` ``""``
    (or a directory, as the authors' loader treats it) means "no mask"; normal entries never get a mask.

``"folder"``
    A plain tree: ``<root>/good/`` normal images, every other non-hidden folder (except ``masks/``)
    holds anomalous images of that defect, optional ``<root>/masks/`` with masks matched by stem
    (``<stem>.png`` or ``<stem>_mask.png``). A mask under ``masks/<defect>/`` serves only images of
    that defect; a mask directly in ``masks/`` serves any defect, and one that matches images of
    several defects raises :class:`DatasetError` (ambiguous). The category is
    the root folder's name. Several categories: the root has no ``good/`` or ``masks/`` of its own
    and every child folder that has a ``good/`` or a ``masks/`` folder is a category named after it
    (other children are ignored with a note). A category without normal images needs an empty
    ``good/`` (or a ``masks/``) folder to be recognised.

``"auto"``
    ``meta.json`` -> meta; ``split_csv/1cls.csv`` -> visa; ``test/``/``train/`` at the root, one or two
    levels down -> mvtec; ``good/`` or ``masks/`` at the root or one level down -> folder.

Common rules: image extensions of ``settings.IMAGE_EXTENSIONS`` (any case, :mod:`visualad.data.files`); hidden files and
folders are skipped; every listing is sorted, so the sample order is deterministic; walking never
follows a symlink into a directory it has already visited (no symlink loops). Classes always come
from the data, never from a table.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from visualad.errors import DatasetError

from ..types import PathLike
from .files import is_image_name, iter_image_files
from .masks import read_mask, resize_mask

logger = logging.getLogger(__name__)

NORMAL_DIR_NAMES = ("good", "ok")  # "ok" is BTAD's name for normal images
FORMATS = ("auto", "mvtec", "visa", "meta", "folder")
SPLITS = ("test", "train")

_ACCEPTED_LAYOUTS = (
    "accepted layouts: meta.json at the root (AnomalyCLIP 'meta'); split_csv/1cls.csv (VisA); "
    "MVTec trees <root>/<cat>/test/<defect>/*, <root>/test/<defect>/* (one category) or "
    "<root>/<dataset>/<cat>/test/<defect>/*; plain folders <root>/good/ + <root>/<defect>/ "
    "[+ <root>/masks/] or <root>/<cat>/good/ ..."
)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. ``mask_path is None`` means an all-zero mask (normal image) or,
    for an anomalous image, that no mask is available (see :attr:`mask_missing`)."""

    image_path: Path
    label: int  # 0 normal, 1 anomalous
    mask_path: Optional[Path]
    category: str
    defect: str  # "good" for normal images

    @property
    def mask_missing(self) -> bool:
        """True for an anomalous image without a mask: pixel metrics must leave it out, since an
        all-zero mask would count its defect pixels as false positives."""
        return self.label == 1 and self.mask_path is None


@dataclass
class Dataset:
    """A flat, ordered list of samples plus the notes gathered while reading (missing masks,
    classes without normals...), so that reports can say why a metric is NaN."""

    root: Path
    format: str
    samples: List[Sample]
    notes: List[str] = field(default_factory=list)

    @property
    def categories(self) -> List[str]:
        """Sorted category names found in the samples."""
        return sorted({s.category for s in self.samples})

    def by_category(self) -> Dict[str, List[Sample]]:
        """Samples grouped per category (sorted keys, sample order kept): metrics are per class."""
        out: Dict[str, List[Sample]] = {c: [] for c in self.categories}
        for s in self.samples:
            out[s.category].append(s)
        return out

    def has_normals(self, category: str) -> bool:
        """Whether image-level metrics are defined for ``category`` (they need normal images)."""
        return any(s.label == 0 for s in self._of(category))

    def has_masks(self, category: str) -> bool:
        """Whether pixel metrics are defined: at least one anomalous sample has a mask.
        (Samples with :attr:`Sample.mask_missing` still have to be left out of pixel metrics.)"""
        return any(s.label == 1 and s.mask_path is not None for s in self._of(category))

    def __len__(self) -> int:
        return len(self.samples)

    def _of(self, category: str) -> List[Sample]:
        samples = [s for s in self.samples if s.category == category]
        if not samples:
            raise KeyError(f"unknown category {category!r}; known: {self.categories}")
        return samples


# --------------------------------------------------------------------------------------------
# public entry points


def load_dataset(root: PathLike, format: str = "auto", split: str = "test") -> Dataset:
    """Read the dataset at ``root`` (layouts: see the module docstring).

    Raises :class:`DatasetError` when the tree matches no accepted layout, when metadata is
    malformed, or when a metadata path points outside the root.
    """
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; choose one of {list(FORMATS)}", root)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {list(SPLITS)}", root)
    root_path = Path(os.path.abspath(os.fspath(root)))
    if not root_path.is_dir():
        raise DatasetError("dataset root is not a directory", root_path)

    fmt = detect_format(root_path) if format == "auto" else format
    notes: List[str] = []
    if fmt == "mvtec":
        samples = _read_mvtec(root_path, split, notes)
    elif fmt == "visa":
        samples = _read_visa(root_path, split, notes)
    elif fmt == "meta":
        samples = _read_meta(root_path, split, notes)
    else:
        samples = _read_folder(root_path, split, notes)

    if not samples:
        raise DatasetError(f"no images found for split {split!r} in this {fmt} dataset", root_path)
    _category_notes(samples, split, notes)
    for note in notes:
        logger.info("%s: %s", root_path, note)
    logger.debug("loaded %d samples (%s, split %s) from %s", len(samples), fmt, split, root_path)
    return Dataset(root=root_path, format=fmt, samples=samples, notes=notes)


def detect_format(root: PathLike) -> str:
    """Guess the layout of ``root`` from marker files and folders (see the module docstring)."""
    r = Path(root)
    if (r / "meta.json").is_file():
        return "meta"
    if (r / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if _is_mvtec_category(r) or _mvtec_categories(r):
        return "mvtec"
    if _folder_categories(r):
        return "folder"
    raise DatasetError(f"cannot tell the dataset layout; {_ACCEPTED_LAYOUTS}", r)


def load_mask(
    sample: Sample,
    size: Optional[Tuple[int, int]] = None,
    image_size: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
    """The boolean mask of ``sample``, shape ``size`` (H, W) if given, else the image's (H, W).

    ``image_size`` is the (H, W) of the image; when omitted the image header is read (no decode).
    The mask is binarised with ``> 0`` (mode ``"1"``, grey and colour masks alike); a mask whose
    size differs from the image's raises :class:`DatasetError` instead of being silently resized.
    Resizing follows the authors' recipe exactly: the 0/255 uint8 mask is resized with PIL
    bilinear (what torchvision's ``Resize`` does on a PIL mask) and thresholded at ``> 127``
    (their ``ToTensor() > 0.5``). ``mask_path is None`` gives all zeros.
    """
    if size is not None:
        size = _check_hw(size, "size")
    if image_size is not None:
        image_size = _check_hw(image_size, "image_size")

    if sample.mask_path is None:
        shape = size or image_size or _image_hw(sample.image_path)
        return np.zeros(shape, dtype=bool)

    img_hw = image_size or _image_hw(sample.image_path)
    mask = read_mask(sample.mask_path, img_hw, image=str(sample.image_path))
    return mask if size is None else resize_mask(mask, size)


# --------------------------------------------------------------------------------------------
# file-system helpers


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list(directory: Path) -> Tuple[List[Path], List[Path]]:
    """Sorted (subdirectories, files) of ``directory``, hidden entries skipped. Whatever is not a directory is a
    file here, a dangling or looping symlink too: a sample is never lost without a word, reading it says why."""
    dirs: List[Path] = []
    files: List[Path] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:  # missing, not a directory, permission, ELOOP
        logger.debug("cannot list %s: %s", directory, exc)
        return dirs, files
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:  # a symlink loop ("a -> a")
            is_dir = False
        (dirs if is_dir else files).append(Path(entry.path))
    return dirs, files


def _subdirs(directory: Path) -> List[Path]:
    return _list(directory)[0]


def _images(directory: Path) -> List[Path]:
    return [p for p in _list(directory)[1] if is_image_name(p.name)]


def _stem_of_mask(name: str) -> str:
    stem = os.path.splitext(name)[0]
    return stem[: -len("_mask")] if stem.endswith("_mask") else stem


def _mask_index(masks: Iterable[Path]) -> Dict[str, List[Path]]:
    """stem -> mask files, ``<stem>_mask.png`` first, then ``<stem>.png``, then other extensions."""
    index: Dict[str, List[Path]] = {}
    for m in masks:
        index.setdefault(_stem_of_mask(m.name), []).append(m)

    def rank(p: Path) -> Tuple[int, int, str]:
        stem, ext = os.path.splitext(p.name)
        return (0 if stem.endswith("_mask") else 1, 0 if ext.lower() == ".png" else 1, str(p))

    for stem in index:
        index[stem].sort(key=rank)
    return index


def _check_unique_stems(images: Sequence[Path], where: Path) -> None:
    """Two images with one stem in one folder (``a.png`` + ``a.jpg``) cannot be paired with masks."""
    seen: Dict[str, Path] = {}
    for p in images:
        stem = os.path.splitext(p.name)[0]
        if stem in seen:
            raise DatasetError(
                f"images {seen[stem].name} and {p.name} share the stem {stem!r}: masks are matched "
                "by stem, so the pairing would be ambiguous",
                where,
            )
        seen[stem] = p


# --------------------------------------------------------------------------------------------
# mvtec


def _is_mvtec_category(d: Path) -> bool:
    return (d / "test").is_dir() or (d / "train").is_dir()


def _mvtec_categories(root: Path) -> List[Tuple[str, Path]]:
    """(name, folder) of every MVTec category at or below ``root`` (up to two levels down)."""
    if _is_mvtec_category(root):
        return [(root.name, root)]
    found: List[Tuple[Optional[str], str, Path]] = []  # (dataset, category, folder)
    for child in _subdirs(root):
        if _is_mvtec_category(child):
            found.append((None, child.name, child))
            continue
        for grandchild in _subdirs(child):
            if _is_mvtec_category(grandchild):
                found.append((child.name, grandchild.name, grandchild))
    counts: Dict[str, int] = {}
    for _, cat, _ in found:
        counts[cat] = counts.get(cat, 0) + 1
    out: List[Tuple[str, Path]] = []
    for ds, cat, folder in found:
        name = f"{ds}/{cat}" if ds is not None and counts[cat] > 1 else cat
        out.append((name, folder))
    return out


def _read_mvtec(root: Path, split: str, notes: List[str]) -> List[Sample]:
    cats = _mvtec_categories(root)
    if not cats:
        raise DatasetError(f"no MVTec category (a folder with test/ or train/) found; {_ACCEPTED_LAYOUTS}", root)
    samples: List[Sample] = []
    for name, folder in cats:
        samples.extend(_read_mvtec_category(name, folder, split, notes))
    return samples


def _read_mvtec_category(name: str, folder: Path, split: str, notes: List[str]) -> List[Sample]:
    split_dir = folder / split
    if not split_dir.is_dir():
        notes.append(f"{name}: no {split}/ folder")
        return []
    samples: List[Sample] = []
    missing: List[str] = []
    for defect_dir in _subdirs(split_dir):
        defect = defect_dir.name
        images = _images(defect_dir)
        if defect.lower() in NORMAL_DIR_NAMES:
            samples.extend(Sample(p, 0, None, name, "good") for p in images)
            continue
        if split == "train":
            notes.append(f"{name}: train/{defect}/ ignored (the train split is read as normal-only)")
            continue
        _check_unique_stems(images, defect_dir)
        gt_dir = folder / "ground_truth" / defect
        index = _mask_index(p for p in _images(gt_dir))
        used: Set[str] = set()
        for p in images:
            stem = os.path.splitext(p.name)[0]
            cands = index.get(stem)
            if cands:
                used.add(stem)
                samples.append(Sample(p, 1, cands[0], name, defect))
            else:
                missing.append(f"{defect}/{p.name}")
                samples.append(Sample(p, 1, None, name, defect))
        orphans = sorted(set(index) - used)
        if orphans:
            notes.append(
                f"{name}: {len(orphans)} mask(s) in ground_truth/{defect}/ match no image "
                f"(e.g. {index[orphans[0]][0].name})"
            )
    if missing:
        _note_unmasked(name, missing, notes)
    return samples


# --------------------------------------------------------------------------------------------
# metadata (visa csv, meta.json): paths are data, so they must stay inside the root


def _inside_root(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` resolved; refuses anything (``..``, absolute, symlink) that lands outside."""
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{what}: empty or non-string path {rel!r}", root)
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(os.path.join(os.fspath(root), rel)))
    try:
        target.relative_to(root_real)
    except ValueError:
        raise DatasetError(
            f"{what}: path {rel!r} resolves to {target}, outside the dataset root {root_real}", root
        ) from None
    return target


def _need_file(path: Path, what: str, root: Path) -> None:
    if not path.is_file():
        raise DatasetError(f"{what}: file {path} does not exist", root)


def _read_visa(root: Path, split: str, notes: List[str]) -> List[Sample]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetError("VisA layout needs split_csv/1cls.csv", root)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        needed = ["object", "split", "label", "image", "mask"]
        absent = [c for c in needed if c not in fields]
        if absent:
            raise DatasetError(f"columns {absent} missing; found {fields}", csv_path)
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    samples: List[Sample] = []
    for i, row in enumerate(rows, start=2):  # line numbers: header is line 1
        if row["split"].lower() != split:
            continue
        what = f"{csv_path.name} line {i}"
        label_s = row["label"].lower()
        if label_s not in ("normal", "anomaly"):
            raise DatasetError(f"{what}: label {row['label']!r} is neither 'normal' nor 'anomaly'", csv_path)
        label = int(label_s == "anomaly")
        image = _inside_root(root, row["image"], what)
        _need_file(image, what, root)
        mask: Optional[Path] = None
        if label == 1 and row["mask"]:
            mask = _inside_root(root, row["mask"], what)
            _need_file(mask, what, root)
        cat = row["object"] or "unknown"
        samples.append(Sample(image, label, mask, cat, "anomaly" if label else "good"))
    _note_missing_masks(samples, notes)
    return samples


def _read_meta(root: Path, split: str, notes: List[str]) -> List[Sample]:
    meta_path = root / "meta.json"
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise DatasetError("meta layout needs meta.json at the root", root) from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read meta.json: {exc}", meta_path) from exc
    if not isinstance(meta, dict):
        raise DatasetError("meta.json must hold an object with 'train'/'test' keys", meta_path)
    key = split if split in meta else next((k for k in meta if isinstance(k, str) and k.lower() == split), None)
    if key is None:
        raise DatasetError(f"split {split!r} not in meta.json; keys present: {sorted(map(str, meta))}", meta_path)
    classes = meta[key]
    if not isinstance(classes, dict):
        raise DatasetError(f"meta.json[{key!r}] must map class names to lists of entries", meta_path)

    samples: List[Sample] = []
    for cls in sorted(classes):
        entries = classes[cls]
        if not isinstance(entries, list):
            raise DatasetError(f"meta.json[{key!r}][{cls!r}] must be a list", meta_path)
        for i, entry in enumerate(entries):
            what = f"meta.json[{key!r}][{cls!r}][{i}]"
            if not isinstance(entry, dict) or "img_path" not in entry:
                raise DatasetError(f"{what}: entry must be an object with 'img_path'", meta_path)
            anomaly = entry.get("anomaly", 0)
            if isinstance(anomaly, str) or anomaly not in (0, 1):
                raise DatasetError(f"{what}: 'anomaly' must be 0 or 1, got {anomaly!r}", meta_path)
            label = int(anomaly)
            image = _inside_root(root, entry["img_path"], f"{what} img_path")
            _need_file(image, f"{what} img_path", root)
            mask: Optional[Path] = None
            mask_rel = entry.get("mask_path") or ""
            if mask_rel:
                resolved = _inside_root(root, mask_rel, f"{what} mask_path")
                # the authors' loader treats a directory (the "" case) as "no mask"
                if label == 1 and not resolved.is_dir():
                    _need_file(resolved, f"{what} mask_path", root)
                    mask = resolved
            cat = str(entry.get("cls_name") or cls)
            defect = "good" if label == 0 else str(entry.get("specie_name") or "anomaly")
            samples.append(Sample(image, label, mask, cat, defect))
    _note_missing_masks(samples, notes)
    return samples


def _note_missing_masks(samples: Sequence[Sample], notes: List[str]) -> None:
    """For metadata formats: a class with some (not all) anomalous images lacking masks."""
    per: Dict[str, List[int]] = {}
    for s in samples:
        if s.label == 1:
            c = per.setdefault(s.category, [0, 0])
            c[0] += 1
            c[1] += s.mask_path is None
    for cat in sorted(per):
        total, missing = per[cat]
        if 0 < missing < total:
            notes.append(
                f"{cat}: {missing} of {total} anomalous image(s) without a mask: "
                "kept for image metrics, left out of pixel metrics"
            )


# --------------------------------------------------------------------------------------------
# plain folders


def _is_folder_category(d: Path) -> bool:
    return (d / "good").is_dir() or (d / "masks").is_dir()


def _folder_categories(root: Path) -> List[Path]:
    if _is_folder_category(root):
        return [root]
    return [c for c in _subdirs(root) if _is_folder_category(c)]


def _read_folder(root: Path, split: str, notes: List[str]) -> List[Sample]:
    cats = _folder_categories(root)
    if not cats:
        raise DatasetError(f"no good/ or masks/ folder found; {_ACCEPTED_LAYOUTS}", root)
    if cats != [root]:
        skipped = [c.name for c in _subdirs(root) if c not in cats]
        if skipped:
            notes.append(f"folders without good/ or masks/ ignored: {skipped}")
    if split == "train":
        notes.append("plain folder layout has no train split: reading the normal images of good/")
    samples: List[Sample] = []
    for folder in cats:
        samples.extend(_read_folder_category(folder, split, notes))
    return samples


def _read_folder_category(folder: Path, split: str, notes: List[str]) -> List[Sample]:
    name = folder.name
    samples: List[Sample] = [Sample(p, 0, None, name, "good") for p in _images(folder / "good")]
    if split == "train":
        return samples
    masks_dir = folder / "masks"
    all_masks = list(iter_image_files(masks_dir)) if masks_dir.is_dir() else []
    loose = [p.name for p in _images(folder)]
    if loose:
        notes.append(f"{name}: {len(loose)} image(s) directly in {folder} ignored (put them in good/ or <defect>/)")
    defect_dirs = [d for d in _subdirs(folder) if d.name not in ("good", "masks")]
    flat = _mask_index(m for m in all_masks if m.parent == masks_dir)
    flat_users: Dict[str, List[str]] = {}
    missing: List[str] = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        images = _images(defect_dir)
        _check_unique_stems(images, defect_dir)
        # masks/<defect>/... serve only that defect (MVTec-like trees reuse stems across defects)
        own = _mask_index(m for m in all_masks if _under(m, masks_dir / defect))
        for p in images:
            stem = os.path.splitext(p.name)[0]
            cands = own.get(stem)
            if not cands and stem in flat:
                cands = flat[stem]
                flat_users.setdefault(stem, []).append(f"{defect}/{p.name}")
            if cands:
                samples.append(Sample(p, 1, cands[0], name, defect))
            else:
                missing.append(f"{defect}/{p.name}")
                samples.append(Sample(p, 1, None, name, defect))
    for stem, users in sorted(flat_users.items()):
        if len(users) > 1:
            raise DatasetError(
                f"mask {flat[stem][0].name} matches several images {users}: "
                "put it in masks/<defect>/ to say which",
                folder,
            )
    if missing and all_masks:
        _note_unmasked(name, missing, notes)
    return samples


def _note_unmasked(name: str, missing: List[str], notes: List[str]) -> None:
    msg = (f"{name}: {len(missing)} anomalous image(s) without a mask (e.g. {missing[0]}): "
           "kept for image metrics, left out of pixel metrics")
    notes.append(msg)
    logger.warning(msg)


def _under(path: Path, directory: Path) -> bool:
    try:
        path.relative_to(directory)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# notes and mask helpers


def _category_notes(samples: Sequence[Sample], split: str, notes: List[str]) -> None:
    """Say up front which metrics a category cannot have, instead of letting them fail later."""
    per: Dict[str, List[Sample]] = {}
    for s in samples:
        per.setdefault(s.category, []).append(s)
    for cat in sorted(per):
        group = per[cat]
        normals = sum(s.label == 0 for s in group)
        anomalous = [s for s in group if s.label == 1]
        if split == "train":
            continue
        if normals == 0:
            notes.append(f"{cat}: no normal images: image metrics undefined (NaN), pixel metrics only")
        if not anomalous:
            notes.append(f"{cat}: no anomalous images: image and pixel metrics undefined (NaN)")
        elif all(s.mask_path is None for s in anomalous):
            notes.append(f"{cat}: no masks: pixel metrics undefined (NaN), image metrics only")


def _check_hw(hw: Tuple[int, int], what: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (height, width) pair of ints, got {hw!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(hw):
        raise ValueError(f"{what} must be a (height, width) pair of positive ints, got {hw!r}")
    return h, w


def _image_hw(path: Path) -> Tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image size: {exc}", path) from exc
    return h, w
