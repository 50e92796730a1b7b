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
import re
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from absl import logging

from fer_keras import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from fer_keras.errors import DataError
from fer_keras.history import atomic_write_text

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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm",
                  ".ppm", ".pbm", ".pnm")
# Bump when parsing changes so stale caches are not reused.
_CACHE_FORMAT = 5
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

    def fingerprint(self) -> str:
        """SHA-256 of the images and labels: equal for the same data wherever the file lives."""
        import hashlib

        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images, np.uint8).tobytes())
        digest.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        return digest.hexdigest()

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
        self.line_open = False  # a "\r..." line is on stderr without its newline

    def update(self, rows: int) -> None:
        if not self.enabled or rows % 1000:
            return
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        self.last = now
        pct = 100.0 * min(self.position() / self.total, 1.0)
        print(f"\rparsing {self.label}: {pct:5.1f}% ({rows:,} rows)", end="", file=sys.stderr, flush=True)
        self.line_open = True

    def done(self, rows: int) -> None:
        if self.enabled:
            print(f"\rparsing {self.label}: 100.0% ({rows:,} rows)", file=sys.stderr)
        self.line_open = False

    def end_line(self) -> None:
        """Ends an unfinished progress line, so that an error message starts a line of its own."""
        if self.line_open:
            print(file=sys.stderr, flush=True)
            self.line_open = False


def _open_text(path: Path) -> tuple[io.TextIOBase, Callable[[], int], Callable[[], None]]:
    """Opens plain or gzip text with BOM and CRLF handled; returns (text, raw position, close).

    Bytes that are not UTF-8 decode to lone surrogates (``surrogateescape``) and are reported by
    :func:`_check_utf8` on the row that holds them: a strict decoder fails on a whole read-ahead
    chunk, which names the wrong line.
    """
    try:
        raw = open(path, "rb")
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a CSV file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    magic = raw.read(2)
    raw.seek(0)
    _refuse_archive(path, raw)
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")

    def close() -> None:
        text.close()
        raw.close()

    return text, raw.tell, close


def _refuse_archive(path: Path, raw: io.BufferedReader) -> None:
    """FER2013 is downloaded as a .tar.gz or a .zip: name that, rather than the archive's bytes as a bad header."""
    head = raw.read(1 << 16)
    raw.seek(0)
    kind = "zip" if head.startswith(b"PK\x03\x04") else None
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(head), mode="rb") as z:
                head = z.read(512)
        except (OSError, EOFError, zlib.error):
            head = b""  # a damaged gzip is reported by the reader, on the line it reaches
    if head[257:262] == b"ustar":
        kind = "tar"
    if kind:
        raise DataError(f"{path}: is a {kind} archive, not a CSV file; extract fer2013.csv from it and pass that")


_INT = re.compile(r"[+-]?[0-9]+")
_WHITESPACE = " \t\n\r\v\f"
_PIXEL_CHARS = b"0123456789" + _WHITESPACE.encode()
_SPLIT_WHITESPACE = re.compile(f"[{re.escape(_WHITESPACE)}]+")


def _to_int(token: str) -> int:
    """An integer token (matching ``_INT``) as int, with magnitudes past 10**6 clamped: Python
    refuses to convert strings of more than 4,300 digits, and any such value is out of range."""
    sign = -1 if token.startswith("-") else 1
    digits = token.lstrip("+-").lstrip("0") or "0"
    return sign * (10**6 if len(digits) > 6 else int(digits))


def _check_utf8(fields: list[str], where: str) -> None:
    """Raises for fields holding bytes that were not UTF-8 (decoded as lone surrogates)."""
    for field in fields:
        if field.isascii():
            continue
        try:
            field.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(field[e.start]) - 0xDC00
            what = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else "invalid character"
            raise DataError(f"{where}: not UTF-8 text ({what})") from None


def _parse_pixels(text: str, where: str) -> np.ndarray:
    """Parses 2,304 whitespace-separated integers 0-255 into uint8.

    The fast path (``np.fromstring``) only sees text made of ASCII digits and whitespace, where it
    cannot misread anything; everything else goes through the slow path, which parses or explains.
    """
    values = None
    if text.isascii() and not text.encode("ascii").translate(None, _PIXEL_CHARS):
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")
        except ValueError:
            values = None
    if values is not None and values.size == NUM_PIXELS:
        bad = np.flatnonzero(values > 255)
        if not bad.size:
            return values.astype(np.uint8)
    tokens = [t for t in _SPLIT_WHITESPACE.split(text) if t]
    for i, tok in enumerate(tokens):
        if not _INT.fullmatch(tok):
            raise DataError(f"{where}: pixel {i + 1} is not an integer: {tok[:20]!r}")
    if len(tokens) != NUM_PIXELS:
        raise DataError(f"{where}: expected {NUM_PIXELS} pixels (48x48), found {len(tokens)}")
    ints = [_to_int(t) for t in tokens]
    for i, v in enumerate(ints):
        if not 0 <= v <= 255:
            raise DataError(f"{where}: pixel {i + 1} is {tokens[i][:20]}, outside 0-255")
    return np.asarray(ints, np.uint8)


def _parse_label(text: str, where: str, column: str) -> int:
    s = text.strip(_WHITESPACE)
    if not _INT.fullmatch(s):
        raise DataError(f"{where}: {column} {s[:20]!r} is not an integer 0-6")
    value = _to_int(s)
    if not 0 <= value < NUM_CLASSES:
        raise DataError(f"{where}: {column} {s[:20]} is outside 0-6")
    return value


_LAYOUT_COLUMNS = {
    # kind: (required columns, optional columns)
    "challenge": ({"emotion", "pixels"}, {"usage"}),
    "course_train": ({"label", "feature"}, set()),
    "course_test": ({"id", "feature"}, set()),
}
_EXPECTED_HEADERS = (
    "emotion,pixels,Usage (challenge), label,feature (train.csv) or id,feature (test.csv)"
)


def _header_kind(header: list[str]) -> str:
    cols = {c.strip(_WHITESPACE).lower() for c in header}
    for kind, (required, optional) in _LAYOUT_COLUMNS.items():
        if required <= cols and cols <= required | optional:
            return kind
    return "unknown"


def _check_header(path: Path, header: list[str]) -> str:
    """Returns the layout of a header; raises naming unknown, missing or repeated columns."""
    where = f"{path}: line 1"
    _check_utf8(header, where)
    cols = [c.strip(_WHITESPACE).lower() for c in header]
    repeated = sorted({c for c in cols if c and cols.count(c) > 1})
    if repeated:
        raise DataError(f"{where}: column(s) {', '.join(map(repr, repeated))} appear more than once")
    kind = _header_kind(header)
    if kind != "unknown":
        return kind
    shown = ",".join(header)[:80]
    # Explain against the layout the header is closest to (most of its required columns present).
    present = set(cols)
    required, optional = max(_LAYOUT_COLUMNS.values(), key=lambda ro: len(ro[0] & present))
    parts = []
    if required & present:
        unknown = [h.strip(_WHITESPACE) for h, c in zip(header, cols) if c not in required | optional]
        missing = sorted(required - present)
        if any(unknown):
            parts.append(f"unknown column(s) {', '.join(repr(u[:20]) for u in unknown if u)}")
        if not all(unknown):
            parts.append(f"{unknown.count('')} column(s) without a name (a stray comma, as a spreadsheet may end "
                         "each line with one?)")
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
    detail = f": {'; '.join(parts)}" if parts else ""
    raise DataError(f"{where}: unrecognised header {shown!r}{detail}; expected {_EXPECTED_HEADERS}")


def read_csv(path: str | os.PathLike, skip_bad_rows: bool = False, course_test: bool = False) -> FerData:
    """Reads a challenge or course CSV (plain or .gz); the header decides which.

    ``course_test`` (a course folder's ``test.csv``) makes a course-layout file the test split even when it has labels
    (``label,feature``, the training header): a labelled test set is never more training images.

    Every bad row raises :class:`DataError` naming the file and line, unless ``skip_bad_rows``,
    which skips it and records the message in ``FerData.skipped``. A damaged file (truncated or
    corrupt gzip, malformed CSV quoting) raises either way.
    """
    path = Path(path)
    text, position, close = _open_text(path)
    skipped: list[str] = []
    progress = None
    try:
        reader = csv.reader(text)
        try:
            header = next(reader, None)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: line 1: file is truncated or corrupt ({e})") from None
        except csv.Error as e:
            raise DataError(f"{path}: line 1: malformed CSV ({e})") from None
        if header is None:
            raise DataError(
                f"{path}: line 1: empty file (expected a header such as emotion,pixels,Usage)"
            )
        kind = _check_header(path, header)
        cols = [c.strip(_WHITESPACE).lower() for c in header]
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
        default_usage = "PrivateTest" if kind == "course_test" or (course_test and kind != "challenge") else "Training"

        # Rows go straight into uint8 blocks: no per-row Python objects and no wide copies.
        chunks: list[np.ndarray] = []
        chunk = np.empty((_CHUNK_ROWS, NUM_PIXELS), np.uint8)
        filled = 0
        labels: list[int] = []
        usages: list[str] = []
        ids: list[str] = []
        id_lines: dict[str, int] = {}  # a submission needs each id once
        progress = _Progress(path.name, path.stat().st_size, position)
        rows = 0
        records = 0  # data rows read, skipped ones included: an id without an id column is the row's ordinal
        while True:
            first_line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(
                    f"{path}: line {first_line}: file is truncated or corrupt ({e})"
                ) from None
            except csv.Error as e:
                raise DataError(f"{path}: line {first_line}: malformed CSV ({e})") from None
            last_line = reader.line_num
            # A quoted field may span lines: name where the record starts (and ends).
            where = f"{path}: line {first_line}"
            if last_line > first_line:
                where += f" (to line {last_line})"
            if not row or (len(row) == 1 and not row[0].strip(_WHITESPACE)):
                continue
            records += 1
            try:
                _check_utf8(row, where)
                if len(row) != ncols:
                    raise DataError(f"{where}: expected {ncols} columns, found {len(row)}")
                pixels = _parse_pixels(row[pixel_col], where)
                label = (
                    _parse_label(row[label_col], where, header[label_col].strip(_WHITESPACE))
                    if label_col is not None
                    else -1
                )
                if usage_col is not None:
                    usage = row[usage_col].strip(_WHITESPACE)
                    if usage not in USAGE_TO_SPLIT:
                        raise DataError(
                            f"{where}: Usage {usage[:20]!r} is not Training, PublicTest or PrivateTest"
                        )
                else:
                    usage = default_usage
                if id_col is not None:
                    row_id = row[id_col].strip(_WHITESPACE)
                    if not row_id:
                        raise DataError(f"{where}: empty id")
                    if row_id in id_lines:
                        raise DataError(f"{where}: id {row_id[:20]!r} already used on line {id_lines[row_id]}")
                    id_lines[row_id] = first_line
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
            ids.append(row_id if id_col is not None else str(records - 1))
            rows += 1
            progress.update(rows)
        progress.done(rows)
        end_line = reader.line_num + 1
    finally:
        if progress is not None:
            progress.end_line()
        close()
    if rows == 0:
        note = f" ({len(skipped)} bad row(s) skipped)" if skipped else ""
        raise DataError(f"{path}: line {end_line}: no data rows after the header{note}")
    # Trim the last block before joining, so the peak is about twice the data, not more.
    last = chunk[:filled].copy()
    del chunk
    if chunks:
        chunks.append(last)
        del last
        images = np.concatenate(chunks)
        del chunks
    else:
        images = last
    images = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)
    label_arr = np.asarray(labels, np.int64)
    usage_arr = np.asarray(usages)
    id_arr = np.asarray(ids)
    splits = {}
    for usage, split in USAGE_TO_SPLIT.items():
        index = np.flatnonzero(usage_arr == usage)
        if not index.size:
            continue
        if index[-1] - index[0] + 1 == index.size:
            # Contiguous rows (the usual file, sorted by Usage): a view, not a copy.
            part = slice(int(index[0]), int(index[-1]) + 1)
            splits[split] = Split(images[part], label_arr[part], id_arr[part])
        else:
            splits[split] = Split(images[index], label_arr[index], id_arr[index])
    layout = "challenge" if kind == "challenge" else "course"
    return FerData(str(path), layout, splits, skipped)


# --------------------------------------------------------------------------------------------
# Image folders


def _subdirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{root}: cannot list folder: {e.strerror or e}") from None


def _class_dirs(root: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    unknown = []
    for child in _subdirs(root):
        name = child.name.lower()
        if name in CLASS_NAMES:
            label = CLASS_NAMES.index(name)
            if label in found:
                raise DataError(
                    f"{root}: class folders {found[label].name} and {child.name} name the same class"
                )
            found[label] = child
        else:
            unknown.append(child.name)
    if found and unknown:
        raise DataError(
            f"{root}: unknown class folder(s) {', '.join(unknown)}; expected {', '.join(CLASS_NAMES)}"
        )
    return found


def _image_files(folder: Path, ignored: list[Path]) -> list[Path]:
    """Files of a class folder (all must be images); sub-folders are noted in ``ignored``."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{folder}: cannot list folder: {e.strerror or e}") from None
    ignored.extend(p for p in entries if p.is_dir())
    # A link to a file that is gone is an image that cannot be read (named by read_image), not nothing.
    return [p for p in entries if p.is_file() or (p.is_symlink() and not p.exists())]


def _stray_images(folder: Path) -> list[Path]:
    """Image files lying next to class folders, where they have no class."""
    try:
        return sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
    except OSError:
        return []


_EXIF_ORIENTATION = 0x0112


def _open_image(path: Path):
    """``PIL.Image.open`` without Pillow's two-line DecompressionBombWarning (images of 89-179 megapixels): a reader
    names such an image in one line itself."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """Reads one image as uint8 48x48x1; returns it and whether it had to be converted."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        with _open_image(path) as img:
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                logging.warning("%s: a very large image (%d x %d pixels); reading it as %dx%d grayscale", path,
                                img.width, img.height, IMAGE_SIZE, IMAGE_SIZE)
            img.load()
            # A netpbm file with a maxval above 255 opens as mode I, its values scaled by Pillow to 0-65535.
            sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM")
            # A camera's orientation tag: the face as it is shown, not as the sensor stored it.
            rotated = img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
            if rotated:
                img = ImageOps.exif_transpose(img)
            converted = rotated or img.mode != "L" or img.size != (IMAGE_SIZE, IMAGE_SIZE)
            if sixteen_bit:
                # PIL's own I;16 -> L conversion clips at 255, which turns a 16-bit face white.
                wide = np.asarray(img).astype(np.float32)
                img = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), "L")
            elif img.mode in ("I", "F"):
                kind = "32-bit integer" if img.mode == "I" else "floating-point"
                raise DataError(f"{path}: {kind} pixels (mode {img.mode}) have no agreed 0-255 scale; "
                                "save the image with 8- or 16-bit pixels")
            elif img.mode != "L":
                img = img.convert("L")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            array = np.asarray(img, np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (
        UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error,
        IndexError, TypeError, Image.DecompressionBombError,
    ) as e:
        # PIL's decoders raise all of these for damaged files.
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"{path}: unreadable image ({reason})") from None
    return array.reshape(IMAGE_SIZE, IMAGE_SIZE, 1), converted


def warn_converted(source: str | os.PathLike, count: int) -> None:
    """Says that ``count`` images were converted, so that a photo squeezed to 48x48 never passes unnoticed."""
    if count:
        logging.warning("%s: %d image(s) were not %dx%d grayscale and were converted", source, count,
                        IMAGE_SIZE, IMAGE_SIZE)


def _read_folder(
    root: Path, classes: dict[int, Path], skip_bad: bool, skipped: list[str], ignored: list[Path]
) -> tuple[Split, int]:
    images, labels, ids = [], [], []
    converted = 0
    for label, folder in sorted(classes.items()):
        for f in _image_files(folder, ignored):
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
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of class folders")
    skipped: list[str] = []
    ignored: list[Path] = _stray_images(root)
    splits: dict[str, Split] = {}
    converted = 0
    sub = {p.name.lower(): p for p in _subdirs(root)}
    if "train" in sub:
        if "test" in sub and "val" in sub:
            raise DataError(f"{root}: has both test/ and val/; both would be the val split, keep one")
        others = sorted(p.name for name, p in sub.items() if name not in ("train", "test", "val"))
        if others:
            raise DataError(
                f"{root}: unknown folder(s) {', '.join(others)} next to train/; expected train/ "
                "and test/ (or val/) holding class folders"
            )
        for name, split in (("train", "train"), ("test", "val"), ("val", "val")):
            if name in sub:
                classes = _class_dirs(sub[name])
                if not classes:
                    raise DataError(f"{sub[name]}: no class folders ({', '.join(CLASS_NAMES)})")
                ignored += _stray_images(sub[name])
                splits[split], n = _read_folder(root, classes, skip_bad_rows, skipped, ignored)
                converted += n
    else:
        classes = _class_dirs(root)
        if not classes:
            raise DataError(
                f"{root}: no class folders ({', '.join(CLASS_NAMES)}), no train/ folder and no "
                "fer2013.csv, train.csv or test.csv"
            )
        splits["train"], converted = _read_folder(root, classes, skip_bad_rows, skipped, ignored)
    if not any(len(s) for s in splits.values()):
        raise DataError(f"{root}: no images found")
    warn_converted(root, converted)
    if ignored:
        shown = ", ".join(str(p.relative_to(root)) for p in ignored[:5])
        more = f" (and {len(ignored) - 5} more)" if len(ignored) > 5 else ""
        logging.warning(
            "%s: ignored %d item(s) that are not in a class folder or are nested in one: %s%s",
            root, len(ignored), shown, more,
        )
    return FerData(str(root), "images", splits, skipped)


# --------------------------------------------------------------------------------------------
# Detection, caching, loading


def _refuse_unlisted_image(path: Path) -> None:
    """An image under a suffix not in IMAGE_SUFFIXES would otherwise be parsed as a CSV ("unrecognised header")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            if f.read(2) == b"\x1f\x8b":  # gzip: a compressed CSV
                return
        with _open_image(path) as img:
            kind = img.format
    except Image.DecompressionBombError:  # a header Pillow knows, of an image too large to open
        kind = "very large"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return
    raise DataError(f"{path}: a {kind} image, but {path.suffix or 'no suffix'} is not an image suffix fer_keras "
                    f"reads ({', '.join(IMAGE_SUFFIXES)}); rename it")


def detect(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """Returns (layout, files) for a path: ``challenge``/``course`` CSV files or ``images``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return "image", [path]
        _refuse_unlisted_image(path)
        return "csv", [path]
    for name in ("fer2013.csv", "fer2013.csv.gz"):
        if (path / name).is_file():
            return "csv", [path / name]
    course = []
    for stem in ("train", "test"):
        found = [path / n for n in (f"{stem}.csv", f"{stem}.csv.gz") if (path / n).is_file()]
        if len(found) > 1:
            raise DataError(f"{path}: holds both {stem}.csv and {stem}.csv.gz; keep one")
        course += found
    if course:
        return "csv", course
    return "images", [path]


def cache_dir() -> Path:
    # Set but empty means unset, not the current directory.
    return Path(os.environ.get("FER_KERAS_CACHE") or Path.home() / ".cache" / "fer_keras")


def _tree_files(root: Path) -> list[Path]:
    """Every file under ``root``, through linked folders as the image reader goes (``Path.rglob`` does not follow
    them before Python 3.13), each real folder once (a link cycle ends), and links to files that are gone."""
    files, seen, folders = [], set(), [root]
    while folders:
        folder = folders.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(folder.iterdir())
        except OSError:  # the reader names the folder it cannot list
            continue
        for p in entries:
            if p.is_dir():
                folders.append(p)
            elif p.is_file() or p.is_symlink():
                files.append(p)
    return sorted(files)


def _fingerprint(layout: str, files: list[Path], skip_bad_rows: bool) -> str:
    h = hashlib.sha1(f"{_CACHE_FORMAT}|{layout}|{skip_bad_rows}".encode())
    for f in files:
        for p in _tree_files(f) if f.is_dir() else [f]:
            try:
                st = p.stat()
                state = f"|{st.st_size}|{st.st_mtime_ns}"
            except OSError:  # a link to a file that is gone: the key changes when the file comes back
                state = "|missing"
            h.update(os.fsencode(p.resolve()) + state.encode())
    return h.hexdigest()[:20]


def _save_cache(target: Path, data: FerData) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, split in data.splits.items():
        arrays[f"{name}_images"] = split.images
        arrays[f"{name}_labels"] = split.labels
        arrays[f"{name}_ids"] = split.ids.astype(str)
    meta = {"source": data.source, "layout": data.layout, "skipped": data.skipped}
    arrays["meta"] = np.asarray(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, buf.getvalue())
    except OSError as e:
        logging.warning("could not write the data cache %s (%s); continuing without it", target, e)


def _load_cache(target: Path) -> FerData | None:
    """The cached data, or None (with a warning) when the file is unreadable or inconsistent.

    A cache is disposable, so any failure to read it (zipfile, npy, JSON, shapes) means "parse
    the source again", never an error.
    """
    try:
        with np.load(target, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            splits = {}
            for name in SPLITS:
                if f"{name}_images" in z:
                    split = Split(z[f"{name}_images"], z[f"{name}_labels"], z[f"{name}_ids"])
                    n = len(split.images)
                    if (
                        split.images.dtype != np.uint8
                        or split.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1)
                        or split.labels.shape != (n,)
                        or split.ids.shape != (n,)
                    ):
                        raise ValueError(f"{name} arrays have unexpected shapes or types")
                    splits[name] = split
        data = FerData(str(meta["source"]), str(meta["layout"]), splits, list(meta.get("skipped", [])))
    except Exception as e:  # noqa: BLE001 - see the docstring
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        logging.warning("ignoring unreadable cache %s (%s)", target, reason)
        return None
    return data


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


def load(path: str | os.PathLike | None = None, skip_bad_rows: bool = False, use_cache: bool = True,
         test_only: bool = False) -> FerData:
    """Loads any supported layout (the bundled sample when ``path`` is None), via the cache. ``test_only``: of a
    course folder, its ``test.csv`` alone (named as the source), so that a prediction of the test split neither
    parses ``train.csv`` nor stops at a bad row there."""
    if path is None or str(path) == "":
        path = SAMPLE_PATH
    path = Path(path).expanduser()
    layout, files = detect(path)
    source = str(path)
    tests = [f for f in files if f.name.lower().startswith("test.")] if layout == "csv" and path.is_dir() else []
    if test_only and tests:
        files, source = tests, str(tests[0])
    if layout == "image":
        array, converted = read_image(files[0])
        warn_converted(files[0], converted)
        split = Split(array[None], np.asarray([-1]), np.asarray([files[0].name]))
        return FerData(str(path), "image", {"test": split})
    # A folder's test.csv is read in its named role, the same file named alone by its header: two cache entries.
    key = _fingerprint(f"{layout}|{'folder' if path.is_dir() else 'file'}", files, skip_bad_rows)
    target = cache_dir() / f"{key}.npz"
    data = _load_cache(target) if use_cache and target.is_file() else None
    if data is not None:
        logging.info("loaded %s from cache %s", path, target)
        data = dataclasses.replace(data, source=source)  # as this caller names it, not as the first one did
    else:
        if layout == "csv":
            data = _merge([read_csv(f, skip_bad_rows, course_test=f in tests) for f in files], source)
        else:
            data = read_image_folder(files[0], skip_bad_rows)
        if use_cache:
            _save_cache(target, data)
    if data.skipped:  # on every load, cached or not: the user must see what the run leaves out
        shown = "; ".join(data.skipped[:5])
        more = f" (and {len(data.skipped) - 5} more)" if len(data.skipped) > 5 else ""
        logging.warning("skipped %d bad row(s): %s%s", len(data.skipped), shown, more)
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
        # At least one image held out, and at least one left to train on.
        n = min(max(1, int(round(idx.size * fraction))), idx.size - 1)
        val_index.append(rng.permutation(idx)[:n])
    val = np.sort(np.concatenate(val_index)) if val_index else np.zeros(0, np.int64)
    mask = np.ones(len(split), bool)
    mask[val] = False
    return split.take(np.flatnonzero(mask)), split.take(val)


def has_labelled_val(data: FerData) -> bool:
    """Whether the source brings its own labelled selection split (FER2013's PublicTest)."""
    return "val" in data.splits and len(data.splits["val"]) > 0 and data.splits["val"].labeled


def hold_out_name(val_fraction: float) -> str:
    """``10% stratified hold-out``: how runs, exports and reports name a hold-out of Training. A whole percent
    is written as it always was (runs record the name); others keep their digits (0.125 was "12%", 0.004 "0%")."""
    percent = f"{val_fraction:.0%}" if round(val_fraction * 100, 9).is_integer() else f"{val_fraction * 100:.3g}%"
    return f"{percent} stratified hold-out"


def train_val(data: FerData, val_fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
    """The training and model-selection splits: PublicTest when the source has it, else a
    seeded stratified hold-out of the training rows."""
    train = data.split("train")
    if not train.labeled:
        raise DataError(f"{data.source}: the training split has no labels")
    if has_labelled_val(data):
        return train, data.splits["val"]
    kept, held_out = stratified_split(train, val_fraction, seed)
    if not len(held_out):
        raise DataError(f"{data.source}: no class has the 2 training images a stratified hold-out needs (one to "
                        f"validate on, one to train on); give more images or a source with a PublicTest split")
    return kept, held_out
