"""Image-level label files: ``{image name: [foreground class ids 1..K]}`` and the class list they carry.

A labels file is a ``.json`` ``{name: [class ids or names]}`` (or ``{"classes": [...], "labels": {...}}``)
or a ``.csv`` ``name,labels`` with ``;``-separated ids or names (:func:`read_labels_file`). Its class list
comes from the JSON's ``"classes"``, a CSV's first line ``#classes: cow;dog`` or a ``classes.txt`` beside
it (:func:`declared_classes`); "background" is implied when not listed first (:func:`with_background`).
The official ``cls_labels_onehot.npy`` is a pickled dict, which ``np.load(allow_pickle=False)`` cannot
read; it is not accepted directly (pickles can run code): convert it once with
:func:`convert_cls_labels_npy`.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .io import IGNORE_INDEX, DataError


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
            "convert it once with wsss.data.convert_cls_labels_npy(path, out_json) and pass the JSON"
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
