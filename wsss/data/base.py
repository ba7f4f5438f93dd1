"""PASCAL VOC 2012 (and the shared machinery of every dataset in ``wsss.data``).

Layout read by :class:`VOCDataset`::

    root/JPEGImages/<name>.jpg
    root/SegmentationClass/<name>.png        # 1,464 train + 1,449 val GT masks
    root/SegmentationClassAug/<name>.png     # 10,582 train_aug (SBD) masks
    root/ImageSets/Segmentation/{train,train_aug,val}.txt

Image-level labels (``labels`` float (K,) over the foreground classes 1..K) come either from a
labels file (``.json`` ``{name: [class ids or names]}`` / ``.csv`` ``name,labels`` with ``;``-separated
ids or names) or are derived from the masks and cached as JSON (in the root, or in
``~/.cache/wsss`` when the root is read-only). The official ``cls_labels_onehot.npy`` is a pickled
dict, which ``np.load(allow_pickle=False)`` cannot read; it is not accepted directly (pickles can run
code): convert it once with :func:`convert_cls_labels_npy`. The cache is keyed by image name only:
delete ``cls_labels_<mask dir>.json`` after editing masks.

Every sample is a dict (see :class:`SegmentationDataset`); all files are checked at construction and
missing ones are listed in one :class:`~wsss.data.io.DataError`.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import (
    IGNORE_INDEX,
    DataError,
    check_mask_values,
    check_same_size,
    dataset_root,
    load_image,
    load_mask,
)
from .transforms import EvalTransform

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".JPG", ".JPEG", ".PNG")

Transform = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def list_stems(directory: Path, exts: Sequence[str]) -> dict[str, Path]:
    """``stem -> path`` of the files in ``directory`` with one of ``exts`` (one listing, no stat per file)."""
    if directory is None or not directory.is_dir():
        return {}
    out: dict[str, Path] = {}
    for entry in os.scandir(directory):
        stem, ext = os.path.splitext(entry.name)
        if ext in exts and stem not in out:
            out[stem] = Path(entry.path)
    return out


def _missing_error(kind: str, missing: Sequence[str], where: Path) -> DataError:
    shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
    return DataError(f"{len(missing)} {kind} missing in {where}: {shown}")


def with_background(names: Sequence[str]) -> tuple[str, ...]:
    """Class names with "background" first (prepended when absent)."""
    names = tuple(str(n) for n in names)
    has_bg = bool(names) and names[0].lower() in ("background", "bg", "_background_")
    return names if has_bg else ("background",) + names


def read_text(path: Path) -> str:
    """A labels file as text (UTF-8, BOM allowed); undecodable bytes are a DataError naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"labels file {path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                        f"save it as UTF-8") from err


_HEADER_NAMES = ("name", "image", "filename", "file")
CLASSES_LINE = "#classes:"
CLASSES_FILE = "classes.txt"


def _class_list(names: Sequence[str], where: str) -> tuple[str, ...]:
    """A declared class list with "background" first (implied when absent, as for ``data.class_names``);
    an empty list, a name twice or "background" elsewhere than first is a DataError naming ``where``."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise DataError(f"{where}: the class list is empty")
    full = with_background(names)
    lower = [n.lower() for n in full]
    twice = sorted({n for n in lower if lower.count(n) > 1})
    if twice:
        raise DataError(f"{where}: the class list names {', '.join(map(repr, twice))} more than once "
                        f"(background, when given, must come first)")
    return full


def _classes_line(text: str) -> tuple[str, str | None]:
    """(the CSV text with its ``#classes:`` line blanked, so that line numbers stay, that line's list or
    None): the line must be the first non-empty one; names separated by ``;``, ``,`` or ``|``."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None or not lines[first].strip().lower().startswith(CLASSES_LINE):
        return text, None
    listed = lines[first].strip()[len(CLASSES_LINE):]
    lines[first] = "\n"
    return "".join(lines), listed.replace(",", ";").replace("|", ";")


def declared_classes(path: str | os.PathLike) -> tuple[tuple[str, ...], str] | None:
    """The class list that a labels file carries, background first, and where it was found: a JSON's
    ``"classes"``, a CSV's first line ``#classes: cow;dog`` or a ``classes.txt`` beside the file (one
    name a line). None without one; two that differ are a DataError naming both."""
    path = Path(path)
    found: list[tuple[tuple[str, ...], str]] = []
    if path.suffix.lower() not in (".json", ".csv", ".tsv", ".txt"):
        return None  # not a labels format: read_labels_file names the problem
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(read_text(path))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot parse labels file {path}: {err}") from err
        if isinstance(data, Mapping) and isinstance(data.get("labels"), Mapping) and data.get("classes"):
            found.append((_class_list(list(map(str, data["classes"])), f"{path}"), f'{path} ("classes")'))
    elif path.is_file():
        listed = _classes_line(read_text(path))[1]
        if listed is not None:
            where = f"{path} ({CLASSES_LINE} line)"
            found.append((_class_list(listed.split(";"), where), where))
    beside = path.parent / CLASSES_FILE
    if beside.is_file() and beside.resolve() != path.resolve():
        found.append((_class_list(read_text(beside).splitlines(), str(beside)), str(beside)))
    if len(found) == 2 and [c.lower() for c in found[0][0]] != [c.lower() for c in found[1][0]]:
        raise DataError(f"{found[0][1]} lists the classes {list(found[0][0][1:])} but {found[1][1]} lists "
                        f"{list(found[1][0][1:])}: make them agree or drop one")
    return found[0] if found else None


def read_csv_labels(path: Path) -> list[tuple[int, str, list[str]]]:
    """Rows ``(line, image name without extension, label tokens)`` of a labels CSV: comma- or
    tab-separated, labels split on ``;``, ``|`` or spaces, an optional header. A row without a labels
    column, an empty name, a name listed twice or an unterminated quote is a DataError naming the line."""
    text = _classes_line(read_text(path))[0]
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delimiter = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, str, list[str]]] = []
    seen: dict[str, int] = {}
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or not any(c.strip() for c in row):
                continue
            if any("\n" in c or "\r" in c for c in row):
                raise DataError(f"labels file {path}, line {line}: a quote opened here closes only at line "
                                f"{reader.line_num}; close it on the same line")
            if not rows and not seen and row[0].strip().lower() in _HEADER_NAMES:
                seen[""] = line  # the header
                continue
            name = os.path.splitext(row[0].strip())[0]
            if len(row) < 2 or not name:
                raise DataError(f"labels file {path}, line {line}: expected 'name{delimiter}labels' "
                                f"(write 'name{delimiter}' for an image without classes), got {row!r}")
            if name in seen:
                raise DataError(f"labels file {path}, line {line}: image {name!r} is already listed at line "
                                f"{seen[name]}")
            seen[name] = line
            rows.append((line, name, " ".join(row[1:]).replace(";", " ").replace("|", " ").split()))
    except csv.Error as err:
        msg = f"labels file {path}, line {start}: a quote opened here is never closed ({err})"
        raise DataError(msg) from err
    return rows


def _parse_label_list(items: Sequence, class_names: Sequence[str], path: Path, name: str,
                      line: int | None = None) -> list[int]:
    """Class ids (1..K) or names -> sorted unique foreground ids; background (0) / 255 are dropped."""
    lookup = {n.lower(): i for i, n in enumerate(class_names)}
    num_classes = len(class_names)
    ids: set[int] = set()
    where = f"labels file {path}" + (f", line {line}" if line is not None else "")
    for item in items:
        token = str(item).strip()
        if not token:
            continue
        if token.lstrip("-").isdigit():
            cid = int(token)
            if cid == IGNORE_INDEX or cid == 0:
                continue
            if not 0 < cid < num_classes:
                raise DataError(f"{where}: image {name!r} has class id {cid} outside 1..{num_classes - 1}")
        elif token.lower() in lookup:
            cid = lookup[token.lower()]
            if cid == 0:
                continue
        else:
            close = difflib.get_close_matches(token.lower(), list(lookup), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}: image {name!r} has unknown class name {token!r}{hint}; known: "
                            f"{', '.join(class_names[1:])}")
        ids.add(cid)
    return sorted(ids)


def read_labels_file(path: str | os.PathLike, class_names: Sequence[str] | None) -> tuple[dict, tuple | None]:
    """Read image-level labels from ``.json`` or ``.csv``.

    JSON: ``{name: [ids or names]}`` or ``{"classes": [...], "labels": {name: [...]}}``.
    CSV: an optional first line ``#classes: cow;dog``, a header ``name,labels`` then rows
    ``img001,cat;dog`` (ids or names, ``;`` or space separated). A ``classes.txt`` beside the file
    (one name a line) gives the class list too (:func:`declared_classes`; background is implied).
    Returns ``({name: [foreground ids]}, class names from the file or None)``; a file's class list
    that differs from ``class_names`` is a DataError naming both."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        raise DataError(
            f"{path}: .npy label dicts are pickles (np.load needs allow_pickle=True, which can run code); "
            "convert it once with wsss.data.base.convert_cls_labels_npy(path, out_json) and pass the JSON"
        )
    declared = declared_classes(path)
    file_classes = declared[0] if declared else None
    lines: dict[str, int] = {}
    try:
        if suffix == ".json":
            data = json.loads(read_text(path))
            if isinstance(data, Mapping) and "labels" in data and isinstance(data["labels"], Mapping):
                data = data["labels"]
            raw = {str(k): (v if isinstance(v, list) else [v]) for k, v in data.items()}
        elif suffix in (".csv", ".tsv", ".txt"):
            rows = read_csv_labels(path)
            raw = {name: tokens for _, name, tokens in rows}
            lines = {name: line for line, name, _ in rows}
        else:
            raise DataError(f"labels file {path}: unsupported format {suffix!r} (use .json, .csv or .tsv)")
    except (json.JSONDecodeError, AttributeError, TypeError) as err:
        raise DataError(f"cannot parse labels file {path}: {err}") from err
    if declared and class_names is not None and [c.lower() for c in declared[0]] != [
            c.lower() for c in with_background(class_names)]:
        raise DataError(f"{declared[1]} lists the classes {list(declared[0][1:])} but data.class_names "
                        f"is {list(with_background(class_names)[1:])}: make them agree or drop one")
    names = file_classes or class_names
    if names is None:
        raise DataError(f"labels file {path}: class names are needed to read it")
    return {k: _parse_label_list(v, names, path, k, lines.get(k)) for k, v in raw.items()}, file_classes


def convert_cls_labels_npy(path_npy: str | os.PathLike, out_json: str | os.PathLike) -> dict[str, list[int]]:
    """Convert an official ``cls_labels_onehot.npy`` (pickled ``{name: K-dim multi-hot}``) to JSON
    ``{name: [class ids 1..K]}``. Loads with ``allow_pickle=True``: only run it on files you trust."""
    warnings.warn(
        f"loading {path_npy} with allow_pickle=True: a pickle can execute code, only convert trusted files",
        stacklevel=2,
    )
    obj = np.load(path_npy, allow_pickle=True)
    data = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object else obj
    if not isinstance(data, Mapping):
        raise DataError(f"{path_npy} does not hold a {{name: multi-hot}} dict")
    out = {str(k): [int(i) + 1 for i in np.flatnonzero(np.asarray(v) > 0.5)] for k, v in data.items()}
    Path(out_json).write_text(json.dumps(out, sort_keys=True))
    return out


def writable_cache(preferred: Path, cache_dir: str | os.PathLike | None) -> Path:
    """``preferred`` when its folder is writable, else a file in ``cache_dir`` (default ~/.cache/wsss)."""
    if cache_dir is None and os.access(preferred.parent, os.W_OK):
        return preferred
    base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "wsss"
    tag = hashlib.sha1(str(preferred.resolve()).encode()).hexdigest()[:12]
    return base / f"{tag}_{preferred.name}"


def labels_from_masks(
    names: Sequence[str],
    mask_paths: Mapping[str, Path],
    num_classes: int,
    cache_file: Path | None = None,
) -> dict[str, list[int]]:
    """Foreground class ids present in each name's mask, read through a JSON cache (updated in place)."""
    cache: dict[str, list[int]] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = {str(k): list(v) for k, v in json.loads(cache_file.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError):
            cache = {}  # a broken cache is rebuilt
    todo = [n for n in names if n not in cache]
    for n in todo:
        values = np.unique(load_mask(mask_paths[n], num_classes))
        cache[n] = [int(v) for v in values if 0 < v != IGNORE_INDEX]
    for n in names:  # ids cached by an earlier run with more classes must not be dropped silently
        check_mask_values(np.asarray(cache[n], dtype=np.int64), num_classes, mask_paths[n])
    if todo and cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, sort_keys=True))
            os.replace(tmp, cache_file)  # atomic: concurrent ranks never read half a file
        except OSError as err:
            warnings.warn(f"could not write the label cache {cache_file}: {err}", stacklevel=2)
    return {n: cache[n] for n in names}


class SegmentationDataset(Dataset):
    """Images + image-level labels (+ optional masks), shared by VOC, COCO and folder datasets.

    ``dataset[i]`` (or ``dataset[(i, seed)]``, as yielded by :func:`wsss.data.build.build_loader`'s
    sampler, for augmentation that does not depend on the worker layout) returns::

        image   float (3, H, W)   ImageNet-normalised RGB
        labels  float (K,)        multi-hot over the foreground classes 1..K
        mask    long (H, W)       0 bg, 1..K, 255 ignore (all 255 without a mask; 255 on padding)
        img_box long (4,)         [row0, row1, col0, col1] of the real image, end-exclusive
        name    str
        size    long (2,)         original (H0, W0)
    """

    def __init__(
        self,
        names: Sequence[str],
        image_paths: Mapping[str, Path],
        mask_paths: Mapping[str, Path | None],
        labels: Mapping[str, Sequence[int]],
        class_names: Sequence[str],
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        self.names = list(names)
        self.image_paths = dict(image_paths)
        self.mask_paths = dict(mask_paths)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = IGNORE_INDEX
        self.transform = transform if transform is not None else EvalTransform()
        k = self.num_classes - 1
        self.labels = np.zeros((len(self.names), k), dtype=np.float32)
        for i, n in enumerate(self.names):
            ids = np.asarray(labels[n], dtype=np.int64)
            self.labels[i, ids[(ids > 0) & (ids <= k)] - 1] = 1.0
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Re-seed the generator used for plain integer indices (called by the worker_init_fn)."""
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.names)

    def has_masks(self) -> bool:
        return any(p is not None for p in self.mask_paths.values())

    def check_masks(self, count: int | None = None) -> None:
        """Read the masks of the first ``count`` images (None: all) once: a value outside the classes
        is a :class:`DataError` naming the file now, not when a pass reaches it."""
        for name in self.names[: count if count is not None else len(self.names)]:
            path = self.mask_paths.get(name)
            if path is not None:
                load_mask(path, self.num_classes)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):
            index, seed = index
            rng = np.random.default_rng(seed)
        else:
            rng = self.rng
        name = self.names[index]
        image = load_image(self.image_paths[name])
        mask_path = self.mask_paths.get(name)
        mask = None
        if mask_path is not None:
            mask = load_mask(mask_path, self.num_classes)
            check_same_size(image, mask, self.image_paths[name], mask_path)
        size = image.shape[:2]
        img, msk, box = self.transform(image, mask, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
            "labels": torch.from_numpy(self.labels[index].copy()),
            "mask": torch.from_numpy(np.ascontiguousarray(msk, dtype=np.int64)),
            "img_box": torch.as_tensor(box, dtype=torch.long),
            "name": name,
            "size": torch.tensor(size, dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"masks={self.has_masks()}, "
            f"transform={self.transform!r})"
        )


def read_split(
    root: Path, split: str | os.PathLike, search: Sequence[str] = ("ImageSets/Segmentation",)
) -> list[str]:
    """Names from a split file: ``split`` is a path, or ``<root>/<search dir>/<split>.txt``.

    Each line's first token is used; list formats like ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
    are reduced to the stem ``x``."""
    candidates = [Path(split)] + [root / d / f"{split}.txt" for d in search] + [root / f"{split}.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"split {split!r} not found; looked for: {', '.join(str(p) for p in candidates)}")
    names = []
    for line in path.read_text().splitlines():
        token = line.strip().split()[0] if line.strip() else ""
        if token and not token.startswith("#"):
            names.append(os.path.splitext(os.path.basename(token))[0])
    if not names:
        raise DataError(f"split file {path} lists no images")
    return names


def build_from_dirs(
    names: Sequence[str],
    image_dir: Path,
    mask_dir: Path | None,
    class_names: Sequence[str],
    transform: Transform | None,
    labels_file: str | os.PathLike | None,
    masks_required: bool,
    cache_file: Path | None,
    seed: int = 0,
) -> dict:
    """Check every file up front and gather the constructor arguments of a :class:`SegmentationDataset`.

    Missing images always raise (all listed). Missing masks raise when ``masks_required`` or when the
    labels must be derived from them; otherwise those images simply have no mask."""
    images = list_stems(image_dir, IMAGE_EXTS)
    missing = [n for n in names if n not in images]
    if missing:
        raise _missing_error("images", missing, image_dir)
    masks = list_stems(mask_dir, (".png", ".PNG")) if mask_dir is not None else {}
    missing_masks = [n for n in names if n not in masks] if mask_dir is not None else []
    labels = None
    file_classes = None
    if labels_file is not None:
        labels, file_classes = read_labels_file(labels_file, class_names)
        class_names = file_classes or class_names
        no_label = [n for n in names if n not in labels]
        if no_label:
            raise _missing_error("image labels", no_label, Path(labels_file))
    if missing_masks and (masks_required or labels is None):
        raise _missing_error("masks", missing_masks, mask_dir)
    if labels is None:
        if mask_dir is None:
            raise DataError(f"no labels_file and no mask directory to derive labels from ({image_dir})")
        labels = labels_from_masks(names, masks, len(class_names), cache_file)
    return dict(
        names=names,
        image_paths={n: images[n] for n in names},
        mask_paths={n: masks.get(n) for n in names},
        labels=labels,
        class_names=class_names,
        transform=transform,
        seed=seed,
    )


def _class_names_for(
    root: Path, num_classes: int | None, class_names: Sequence[str] | None
) -> tuple[str, ...]:
    if class_names is not None:
        names = with_background(class_names)
    elif (root / "class_names.json").is_file():
        names = with_background(json.loads((root / "class_names.json").read_text()))
    elif num_classes in (None, len(VOC_CLASSES)):
        names = VOC_CLASSES
    else:
        names = ("background",) + tuple(f"class{i}" for i in range(1, num_classes))
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{root}: {len(names)} class names ({names[:4]}...) but num_classes={num_classes}")
    return tuple(names)


class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 layout (module docstring).

    ``mask_dir="auto"`` uses SegmentationClassAug for splits whose name contains "aug" and
    SegmentationClass otherwise (falling back to whichever exists); ``None`` disables masks (then a
    ``labels_file`` is required). ``num_classes=None`` reads ``root/class_names.json`` if present, else 21.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike,
        transform: Transform | None = None,
        num_classes: int | None = None,
        labels_file: str | os.PathLike | None = None,
        mask_dir: str | None = "auto",
        class_names: Sequence[str] | None = None,
        image_dir: str = "JPEGImages",
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        root = dataset_root(root)
        names = read_split(root, split)
        explicit = mask_dir not in (None, "auto")
        if mask_dir == "auto":
            order = ("SegmentationClassAug", "SegmentationClass")
            order = order if "aug" in Path(str(split)).stem.lower() else order[::-1]
            mask_dir = next((d for d in order if (root / d).is_dir()), None)
        mdir = None if mask_dir is None else root / mask_dir
        if explicit and not mdir.is_dir():
            raise DataError(f"mask directory not found: {mdir}")
        if class_names is None and labels_file is not None and Path(labels_file).is_file():
            class_names = (declared_classes(labels_file) or (None,))[0]  # the labels file's own list
        cache = None
        if mask_dir is not None:
            cache = writable_cache(root / f"cls_labels_{str(mask_dir).replace('/', '_')}.json", cache_dir)
        super().__init__(
            **build_from_dirs(
                names, root / image_dir, mdir, _class_names_for(root, num_classes, class_names),
                transform, labels_file, explicit, cache, seed,
            )
        )  # fmt: skip
        self.root = root
        self.split = str(split)
        self.mask_dir = mdir
