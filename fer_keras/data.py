"""Reading FER2013 in the layouts users have, caching it, and splitting it.

Three layouts are read and auto-detected from one path:

* the challenge file ``fer2013.csv`` (``emotion,pixels,Usage``), plain or gzip-compressed;
* the course layout ``train.csv`` (``label,feature``) and ``test.csv`` (``id,feature``), given as
  either file or the folder holding them;
* image folders ``ROOT/<class name>/*.jpg|png``, optionally below ``ROOT/train`` and ``ROOT/test``.

Everything is held as uint8 ``(N, 48, 48, 1)`` arrays: the full data set is ~75 MB that way, and
floats only appear inside the model. Parsed files are cached as ``.npz`` keyed by the source's path,
size and modification time, so the second run starts in about a second.

Split names are ``train``, ``val`` (model selection: FER2013's PublicTest) and ``test``
(PrivateTest); the challenge's names are accepted as aliases.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from absl import logging

from fer_keras import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from fer_keras.errors import DataError

NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
SAMPLE_PATH = Path(__file__).resolve().parent / "assets" / "fer2013_sample.csv.gz"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "training": "train",
    "train": "train",
    "publictest": "val",
    "val": "val",
    "validation": "val",
    "privatetest": "test",
    "test": "test",
}
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SPLIT_TO_USAGE = {v: k for k, v in USAGE_TO_SPLIT.items()}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Bump when parsing changes so stale caches are not reused.
_CACHE_FORMAT = 2
_CHUNK_ROWS = 4096


@dataclasses.dataclass
class Split:
    """Images of one split: uint8 ``(N, 48, 48, 1)``, int64 labels (-1 = unlabeled) and ids."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def labeled(self) -> bool:
        return bool(len(self)) and bool((self.labels >= 0).all())

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=NUM_CLASSES)

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index], self.ids[index])


@dataclasses.dataclass
class FerData:
    """What a source holds: its splits (any of train/val/test) and where they came from."""

    source: str
    layout: str
    splits: dict[str, Split]
    skipped: list[str] = dataclasses.field(default_factory=list)

    def split(self, name: str) -> Split:
        key = canonical_split(name)
        if key not in self.splits or not len(self.splits[key]):
            have = ", ".join(sorted(k for k, v in self.splits.items() if len(v))) or "none"
            raise DataError(f"{self.source}: has no '{name}' split (it has: {have})")
        return self.splits[key]


def canonical_split(name: str) -> str:
    key = SPLIT_ALIASES.get(name.strip().lower())
    if key is None:
        raise DataError(
            f"unknown split '{name}': use train, val (PublicTest) or test (PrivateTest)"
        )
    return key


def split_label(name: str) -> str:
    """``val (PublicTest)``: how a split is named in reports, so accuracy always names its split."""
    key = canonical_split(name)
    return f"{key} ({SPLIT_TO_USAGE[key]})"


# --------------------------------------------------------------------------------------------
# CSV layouts


class _Progress:
    """Prints parsing progress to stderr for large files, at most about once a second."""

    def __init__(self, label: str, total_bytes: int, position: Callable[[], int]):
        self.label = label
        self.total = max(total_bytes, 1)
        self.position = position
        self.enabled = total_bytes > 8 << 20
        self.last = time.monotonic()

    def update(self, rows: int) -> None:
        if not self.enabled or rows % 1000:
            return
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        self.last = now
        pct = 100.0 * min(self.position() / self.total, 1.0)
        print(f"\rparsing {self.label}: {pct:5.1f}% ({rows:,} rows)", end="", file=sys.stderr)

    def done(self, rows: int) -> None:
        if self.enabled:
            print(f"\rparsing {self.label}: 100.0% ({rows:,} rows)", file=sys.stderr)


def _open_text(path: Path) -> tuple[io.TextIOBase, Callable[[], int], Callable[[], None]]:
    """Opens plain or gzip text with BOM and CRLF handled; returns (text, raw position, close)."""
    try:
        raw = open(path, "rb")
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a CSV file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    magic = raw.read(2)
    raw.seek(0)
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict", newline="")

    def close() -> None:
        text.close()
        raw.close()

    return text, raw.tell, close


def _parse_pixels(text: str, where: str) -> np.ndarray:
    """Parses 2,304 space-separated integers 0-255; the slow path only runs to explain an error."""
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    tokens = None
    if values.size != NUM_PIXELS:
        tokens = text.split()
        for i, tok in enumerate(tokens):
            if not tok.lstrip("+-").isdigit():
                raise DataError(f"{where}: pixel {i + 1} is not an integer: {tok[:20]!r}")
        raise DataError(
            f"{where}: expected {NUM_PIXELS} pixels (48x48), found {len(tokens)}"
        )
    bad = np.flatnonzero((values < 0) | (values > 255))
    if bad.size:
        raise DataError(
            f"{where}: pixel {bad[0] + 1} is {values[bad[0]]}, outside 0-255"
        )
    return values.astype(np.uint8)


def _parse_label(text: str, where: str, column: str) -> int:
    s = text.strip()
    if not s.lstrip("+-").isdigit():
        raise DataError(f"{where}: {column} {text.strip()[:20]!r} is not an integer 0-6")
    value = int(s)
    if not 0 <= value < NUM_CLASSES:
        raise DataError(f"{where}: {column} {value} is outside 0-6")
    return value


def _header_kind(header: list[str]) -> str:
    cols = [c.strip().lower() for c in header]
    if {"emotion", "pixels"} <= set(cols):
        return "challenge"
    if {"label", "feature"} <= set(cols):
        return "course_train"
    if {"id", "feature"} <= set(cols):
        return "course_test"
    return "unknown"


def read_csv(path: str | os.PathLike, skip_bad_rows: bool = False) -> FerData:
    """Reads a challenge or course CSV (plain or .gz); the header decides which.

    Every bad row raises :class:`DataError` naming the file and line, unless ``skip_bad_rows``,
    which skips it and records the message in ``FerData.skipped``.
    """
    path = Path(path)
    text, position, close = _open_text(path)
    skipped: list[str] = []
    try:
        reader = csv.reader(text)
        try:
            header = next(reader, None)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: unreadable: {e}") from None
        if header is None:
            raise DataError(f"{path}: empty file (expected a header such as emotion,pixels,Usage)")
        kind = _header_kind(header)
        if kind == "unknown":
            raise DataError(
                f"{path}: line 1: unrecognised header {','.join(header)[:80]!r}; expected "
                "emotion,pixels,Usage (challenge), label,feature (train.csv) or id,feature (test.csv)"
            )
        cols = [c.strip().lower() for c in header]
        if kind == "challenge":
            label_col, pixel_col = cols.index("emotion"), cols.index("pixels")
            usage_col = cols.index("usage") if "usage" in cols else None
            id_col = None
        else:
            label_col = cols.index("label") if kind == "course_train" else None
            pixel_col = cols.index("feature")
            id_col = cols.index("id") if kind == "course_test" else None
            usage_col = None
        ncols = len(header)

        chunks: list[np.ndarray] = []
        chunk = np.empty((_CHUNK_ROWS, NUM_PIXELS), np.uint8)
        filled = 0
        labels: list[int] = []
        usages: list[str] = []
        ids: list[str] = []
        progress = _Progress(path.name, path.stat().st_size, position)
        rows = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(
                    f"{path}: line {reader.line_num + 1}: file is truncated or corrupt ({e})"
                ) from None
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {reader.line_num + 1}: not UTF-8 text ({e.reason})") from None
            except csv.Error as e:
                raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
            where = f"{path}: line {reader.line_num}"
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            try:
                if len(row) != ncols:
                    raise DataError(f"{where}: expected {ncols} columns, found {len(row)}")
                pixels = _parse_pixels(row[pixel_col], where)
                label = (
                    _parse_label(row[label_col], where, header[label_col].strip())
                    if label_col is not None
                    else -1
                )
                if usage_col is not None:
                    usage = row[usage_col].strip()
                    if usage not in USAGE_TO_SPLIT:
                        raise DataError(
                            f"{where}: Usage {usage[:20]!r} is not Training, PublicTest or PrivateTest"
                        )
                else:
                    usage = "Training" if kind != "course_test" else "PrivateTest"
            except DataError as e:
                if not skip_bad_rows:
                    raise
                skipped.append(str(e))
                continue
            chunk[filled] = pixels
            filled += 1
            if filled == _CHUNK_ROWS:
                chunks.append(chunk)
                chunk = np.empty((_CHUNK_ROWS, NUM_PIXELS), np.uint8)
                filled = 0
            labels.append(label)
            usages.append(usage)
            ids.append(row[id_col].strip() if id_col is not None else str(rows))
            rows += 1
            progress.update(rows)
        progress.done(rows)
    finally:
        close()
    chunks.append(chunk[:filled])
    if rows == 0:
        raise DataError(f"{path}: no data rows after the header")
    images = np.concatenate(chunks).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)
    del chunks
    label_arr = np.asarray(labels, np.int64)
    usage_arr = np.asarray(usages)
    id_arr = np.asarray(ids)
    splits = {}
    for usage, split in USAGE_TO_SPLIT.items():
        index = np.flatnonzero(usage_arr == usage)
        if index.size:
            splits[split] = Split(images[index], label_arr[index], id_arr[index])
    layout = "challenge" if kind == "challenge" else "course"
    return FerData(str(path), layout, splits, skipped)


# --------------------------------------------------------------------------------------------
# Image folders


def _class_dirs(root: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    unknown = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        name = child.name.lower()
        if name in CLASS_NAMES:
            found[CLASS_NAMES.index(name)] = child
        elif not name.startswith("."):
            unknown.append(child.name)
    if found and unknown:
        raise DataError(
            f"{root}: unknown class folder(s) {', '.join(unknown)}; expected {', '.join(CLASS_NAMES)}"
        )
    return found


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """Reads one image as uint8 48x48x1; returns it and whether it had to be converted."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        with Image.open(path) as img:
            img.load()
            converted = img.mode != "L" or img.size != (IMAGE_SIZE, IMAGE_SIZE)
            if img.mode != "L":
                img = img.convert("L")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            array = np.asarray(img, np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None
    return array.reshape(IMAGE_SIZE, IMAGE_SIZE, 1), converted


def _read_folder(root: Path, classes: dict[int, Path], skip_bad: bool, skipped: list[str]) -> tuple[Split, int]:
    images, labels, ids = [], [], []
    converted = 0
    for label, folder in sorted(classes.items()):
        for f in _image_files(folder):
            try:
                array, conv = read_image(f)
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
                continue
            converted += conv
            images.append(array)
            labels.append(label)
            ids.append(str(f.relative_to(root)))
    if not images:
        return Split(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8), np.zeros(0, np.int64), np.zeros(0, str)), 0
    return Split(np.stack(images), np.asarray(labels, np.int64), np.asarray(ids)), converted


def read_image_folder(root: str | os.PathLike, skip_bad_rows: bool = False) -> FerData:
    """Reads ``ROOT/<class>/*`` (all train) or ``ROOT/train/<class>`` + ``ROOT/test/<class>``
    (test = FER2013's PublicTest in the image-folder distribution, so it becomes ``val``)."""
    root = Path(root)
    skipped: list[str] = []
    splits: dict[str, Split] = {}
    converted = 0
    sub = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "train" in sub:
        for name, split in (("train", "train"), ("test", "val"), ("val", "val")):
            if name in sub:
                classes = _class_dirs(sub[name])
                if not classes:
                    raise DataError(f"{sub[name]}: no class folders ({', '.join(CLASS_NAMES)})")
                splits[split], n = _read_folder(root, classes, skip_bad_rows, skipped)
                converted += n
    else:
        classes = _class_dirs(root)
        if not classes:
            raise DataError(
                f"{root}: no class folders ({', '.join(CLASS_NAMES)}), no train/ folder and no CSV file"
            )
        splits["train"], converted = _read_folder(root, classes, skip_bad_rows, skipped)
    if not any(len(s) for s in splits.values()):
        raise DataError(f"{root}: no images found")
    if converted:
        logging.warning("%s: %d image(s) were not 48x48 grayscale and were converted", root, converted)
    return FerData(str(root), "images", splits, skipped)


# --------------------------------------------------------------------------------------------
# Detection, caching, loading


def detect(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """Returns (layout, files) for a path: ``challenge``/``course`` CSV files or ``images``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return "image", [path]
        return "csv", [path]
    for name in ("fer2013.csv", "fer2013.csv.gz"):
        if (path / name).is_file():
            return "csv", [path / name]
    course = [path / n for n in ("train.csv", "test.csv", "train.csv.gz", "test.csv.gz") if (path / n).is_file()]
    if course:
        return "csv", course
    return "images", [path]


def cache_dir() -> Path:
    return Path(os.environ.get("FER_KERAS_CACHE", Path.home() / ".cache" / "fer_keras"))


def _fingerprint(layout: str, files: list[Path], skip_bad_rows: bool) -> str:
    h = hashlib.sha1(f"{_CACHE_FORMAT}|{layout}|{skip_bad_rows}".encode())
    for f in files:
        if f.is_dir():
            for p in sorted(f.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _save_cache(target: Path, data: FerData) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, split in data.splits.items():
        arrays[f"{name}_images"] = split.images
        arrays[f"{name}_labels"] = split.labels
        arrays[f"{name}_ids"] = split.ids.astype(str)
    meta = {"source": data.source, "layout": data.layout, "skipped": data.skipped}
    arrays["meta"] = np.asarray(json.dumps(meta))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, target)
    except OSError as e:
        logging.warning("could not write the data cache %s (%s); continuing without it", target, e)


def _load_cache(target: Path) -> FerData | None:
    try:
        with np.load(target, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            splits = {}
            for name in SPLITS:
                if f"{name}_images" in z:
                    splits[name] = Split(z[f"{name}_images"], z[f"{name}_labels"], z[f"{name}_ids"])
    except (OSError, ValueError, KeyError, zlib.error, EOFError) as e:
        logging.warning("ignoring unreadable cache %s (%s)", target, e)
        return None
    return FerData(meta["source"], meta["layout"], splits, meta.get("skipped", []))


def _merge(parts: list[FerData], source: str) -> FerData:
    splits: dict[str, Split] = {}
    for part in parts:
        for name, split in part.splits.items():
            if name in splits:
                a = splits[name]
                splits[name] = Split(
                    np.concatenate([a.images, split.images]),
                    np.concatenate([a.labels, split.labels]),
                    np.concatenate([a.ids, split.ids]),
                )
            else:
                splits[name] = split
    return FerData(source, parts[0].layout, splits, sum((p.skipped for p in parts), []))


def load(path: str | os.PathLike | None = None, skip_bad_rows: bool = False, use_cache: bool = True) -> FerData:
    """Loads any supported layout (the bundled sample when ``path`` is None), via the cache."""
    if path is None or str(path) == "":
        path = SAMPLE_PATH
    path = Path(path).expanduser()
    layout, files = detect(path)
    if layout == "image":
        array, _ = read_image(files[0])
        split = Split(array[None], np.asarray([-1]), np.asarray([files[0].name]))
        return FerData(str(path), "image", {"test": split})
    key = _fingerprint(layout, files, skip_bad_rows)
    target = cache_dir() / f"{key}.npz"
    if use_cache and target.is_file():
        cached = _load_cache(target)
        if cached is not None:
            logging.info("loaded %s from cache %s", path, target)
            return cached
    if layout == "csv":
        data = _merge([read_csv(f, skip_bad_rows) for f in files], str(path))
    else:
        data = read_image_folder(files[0], skip_bad_rows)
    if data.skipped:
        shown = "; ".join(data.skipped[:5])
        more = f" (and {len(data.skipped) - 5} more)" if len(data.skipped) > 5 else ""
        logging.warning("skipped %d bad row(s): %s%s", len(data.skipped), shown, more)
    if use_cache:
        _save_cache(target, data)
    return data


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Holds out ``fraction`` of each class (at least one image per class that has two)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val_index = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(split.labels == c)
        if idx.size < 2:
            continue
        n = max(1, int(round(idx.size * fraction)))
        val_index.append(rng.permutation(idx)[:n])
    val = np.sort(np.concatenate(val_index)) if val_index else np.zeros(0, np.int64)
    mask = np.ones(len(split), bool)
    mask[val] = False
    return split.take(np.flatnonzero(mask)), split.take(val)


def train_val(data: FerData, val_fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
    """The training and model-selection splits: PublicTest when the source has it, else a
    seeded stratified hold-out of the training rows."""
    train = data.split("train")
    if not train.labeled:
        raise DataError(f"{data.source}: the training split has no labels")
    if "val" in data.splits and len(data.splits["val"]) and data.splits["val"].labeled:
        return train, data.splits["val"]
    return stratified_split(train, val_fraction, seed)


def iter_batches(split: Split, batch_size: int) -> Iterator[Split]:
    for start in range(0, len(split), batch_size):
        yield split.take(np.arange(start, min(start + batch_size, len(split))))
