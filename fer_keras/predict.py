"""Predict expressions for unlabeled images: ``python -m fer_keras.predict --data=test.csv``.

Inputs (``--data``): the course ``test.csv`` (``id,feature``) or any other layout that
:func:`fer_keras.data.load` reads, a folder of images (flat, or with class sub-folders), one image
file, or a comma-separated list of image files. The output is the course's submission format,
``id,label`` with the class index 0-6, optionally followed by one probability column per class
(``--probabilities``). It is written to a temporary file and renamed, so an interrupted run never
leaves a truncated submission behind.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import flags, logging

from fer_keras import CLASS_NAMES, IMAGE_SIZE, cli
from fer_keras import data as fer_data
from fer_keras import tta as tta_lib
from fer_keras.errors import ConfigError, DataError
from fer_keras.history import atomic_write_text, check_creatable, check_replaceable
from fer_keras.tta import check_tta, tta_probabilities

PROBABILITY_COLUMNS = tuple(f"prob_{name}" for name in CLASS_NAMES)
DEFAULT_OUTPUT = "predictions.csv"  # in the working directory; .gitignore keeps the repository's out of git


def atomic_write(path: str | os.PathLike, content: str | bytes) -> Path:
    """Writes ``content`` to a temporary file beside ``path`` and renames it into place."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected an output file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, content)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror or e}") from None
    return path


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in fer_data.IMAGE_SUFFIXES


def read_images(paths: Sequence[Path], skip_bad: bool = False) -> fer_data.Split:
    """Reads image files as an unlabeled split whose ids are the file names.

    When two files share a name (from different folders) the ids are the paths as given instead,
    so that every row of a submission can be traced back to one file. ``skip_bad`` leaves unreadable
    images out, each reported, instead of stopping at the first.
    """
    if not paths:
        raise DataError("no image files given")
    arrays, kept, skipped, converted = [], [], [], 0
    for p in paths:
        try:
            array, conv = fer_data.read_image(p)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        arrays.append(array)
        kept.append(p)
        converted += conv
    if skipped and not kept:
        raise DataError(f"none of the {len(paths)} image file(s) could be read; first: {skipped[0]}")
    if skipped:  # as data.load reports skipped rows
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        logging.warning("skipped %d unreadable image(s): %s%s", len(skipped), "; ".join(skipped[:5]), more)
    if converted:
        logging.warning("%d image(s) were not %dx%d grayscale and were converted", converted, IMAGE_SIZE, IMAGE_SIZE)
    paths = kept
    names = [p.name for p in paths]
    ids = names if len(set(names)) == len(names) else [str(p) for p in paths]
    return fer_data.Split(np.stack(arrays), np.full(len(paths), -1, np.int64), np.asarray(ids))


def _flat_image_folder(folder: Path) -> list[Path] | None:
    """The images directly inside ``folder``, or None when it is a labeled layout for data.load. A link to an image
    that is gone is kept, so that the reader names it; files under other suffixes are named as not read, since a
    submission would otherwise lack their rows without a word."""
    entries = list(folder.iterdir())
    if {p.name.lower() for p in entries if p.is_dir()} & (set(CLASS_NAMES) | {"train", "test", "val"}):
        return None
    visible = [p for p in entries if not p.name.startswith(".")]
    files = [p for p in visible if p.is_file() or (p.is_symlink() and not p.exists())]
    images = sorted(p for p in files if _is_image(p))
    others = sorted(p.name for p in files if not _is_image(p))
    nested = sorted(p.name for p in visible if p.is_dir())
    suffixes = ", ".join(fer_data.IMAGE_SUFFIXES)
    if others and not images and not nested:
        raise DataError(f"{folder}: holds no image under a suffix fer_keras reads ({suffixes}), only {_some(others)}")
    if images and others:
        logging.warning("%s: %s not read: not an image suffix fer_keras reads (%s)", folder, _some(others), suffixes)
    if images and nested:
        logging.warning("%s: predicting the %d image(s) directly inside; sub-folder(s) %s are not read (name them "
                        "in --data to predict theirs)", folder, len(images), ", ".join(nested))
    return images or None


def _some(names: Sequence[str], shown: int = 5) -> str:
    """``3 file(s) a, b, c`` or ``8 file(s) a, b, c, d, e (and 3 more)``: names for a one-line message."""
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} file(s) " + ", ".join(names[:shown]) + more


def choose_split(data: fer_data.FerData, split: str | None) -> tuple[fer_data.Split, str]:
    """The split to predict: ``split`` if given, else ``test`` if present, else the only split."""
    if split:
        return data.split(split), fer_data.split_label(split)
    present = [name for name in fer_data.SPLITS if name in data.splits and len(data.splits[name])]
    if "test" in present:
        return data.splits["test"], fer_data.split_label("test")
    if len(present) == 1:
        return data.splits[present[0]], fer_data.split_label(present[0])
    raise ConfigError(f"{data.source}: has splits {', '.join(present)}; choose one with --split")


def load_inputs(spec: str, split: str | None = None, skip_bad_rows: bool = False) -> tuple[fer_data.Split, str]:
    """Reads ``--data`` and returns the split to predict with a description for messages; ``skip_bad_rows``
    leaves malformed CSV rows and unreadable images out, each reported."""
    if not spec:
        raise ConfigError("--data is empty: give a test.csv, an image folder or image files")
    path = Path(spec).expanduser()
    if not path.exists() and "," in spec:
        paths = [Path(s.strip()).expanduser() for s in spec.split(",") if s.strip()]
        seen: dict[Path, Path] = {}
        for p in paths:
            if not p.is_file():  # a folder among them is named as one, not as missing
                problem = "a folder; a list names image files" if p.is_dir() else "no such image file"
                raise DataError(f"{p}: {problem}")
            first = seen.setdefault(p.resolve(), p)
            if first is not p:  # its two rows would share one id
                raise ConfigError(f"{p}: named twice in --data" + (f" (also as {first})" if first != p else ""))
        if split:
            raise ConfigError("--split does not apply to a list of image files")
        split = read_images(paths, skip_bad_rows)
        return split, f"{len(split)} image file(s)"
    if path.is_dir() and fer_data.detect(path)[0] == "images":
        images = _flat_image_folder(path)
        if images is not None:
            if split:
                raise ConfigError(f"{path}: --split does not apply to a folder of images")
            split = read_images(images, skip_bad_rows)
            return split, f"{len(split)} image(s) in {path}"
    test_only = not split or fer_data.canonical_split(split) == "test"
    data = fer_data.load(path, skip_bad_rows=skip_bad_rows, test_only=test_only)
    if data.layout == "image":
        if split:
            raise ConfigError(f"{path}: --split does not apply to an image file")
        return data.splits["test"], str(path)
    chosen, label = choose_split(data, split)
    if data.layout == "course":  # the course's own split, not FER2013's Usage of that name
        label = label.split(" (")[0]
    return chosen, f"{label} of {data.source}"


def check_output(path: str | os.PathLike) -> None:
    """Refuses an output that could not be written or would replace anything but an earlier predictions CSV."""
    check_creatable(path, "--output")
    check_replaceable(path, (b"id,label\n", b"id,label\r\n", b"id,label,"),
                      "a predictions CSV (its first line is not id,label...)")


def write_predictions(
    path: str | os.PathLike,
    ids: np.ndarray,
    probabilities: np.ndarray,
    with_probabilities: bool = False,
) -> Path:
    """Writes ``id,label`` (label = argmax class index) and optionally ``prob_<class>`` columns."""
    if len(ids) != len(probabilities):
        raise ValueError(f"{len(ids)} ids but {len(probabilities)} rows of probabilities")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"] + (list(PROBABILITY_COLUMNS) if with_probabilities else []))
    labels = np.argmax(probabilities, axis=1)
    for row_id, label, probs in zip(ids, labels, probabilities):
        row = [str(row_id), int(label)]
        if with_probabilities:
            row += [f"{p:.6f}" for p in probs]
        writer.writerow(row)
    return atomic_write(path, buffer.getvalue())


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A .keras file, a training run directory or a SavedModel export "
                        "(default: the shipped saved_models/fer_resnet18).")
    flags.DEFINE_string("data", None, "test.csv (id,feature), another FER2013 file or folder, a folder of "
                        "images, an image file, or a comma-separated list of image files.")
    flags.DEFINE_string("split", "", "Split to predict when the data has several (train, val/PublicTest, "
                        "test/PrivateTest); default: test if present, else the only split.")
    flags.DEFINE_string("output", DEFAULT_OUTPUT, "Output CSV (id,label), written atomically.")
    flags.DEFINE_boolean("probabilities", False, "Add one probability column per class (prob_angry, ...).")
    tta_lib.define_flags()
    cli.define_skip_bad_rows("CSV files, image folders and lists of images; the rows kept keep their ids.")
    flags.mark_flag_as_required("data")
    flags.register_validator("output", lambda v: bool(v), "--output must not be empty")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    if f.split:
        fer_data.canonical_split(f.split)
    check_tta(f.tta, f.crop_size)
    check_output(f.output)
    from fer_keras import inference

    inference.resolve(f.model)  # a missing model fails before the data is read
    split, description = load_inputs(f.data, f.split or None, f.skip_bad_rows)
    predictor = inference.load_predictor(f.model)
    probabilities = tta_probabilities(predictor, split.images, f.tta, f.crop_size, f.batch_size)
    path = write_predictions(f.output, split.ids, probabilities, f.probabilities)
    counts = np.bincount(np.argmax(probabilities, axis=1), minlength=len(CLASS_NAMES))
    spread = ", ".join(f"{CLASS_NAMES[c]} {counts[c]}" for c in np.argsort(-counts, kind="stable") if counts[c])
    print(f"model: {predictor.kind} {predictor.path}")
    views = f.tta if predictor.built_in_tta == "none" else f"{predictor.built_in_tta}, built into the export"
    print(f"wrote {len(split)} predictions for {description} (tta: {views}) to {path}")
    print(f"predicted classes: {spread}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
