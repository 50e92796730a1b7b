"""Evaluate a model on one labeled split: ``python -m fer_keras.evaluate [--split=val] [--tta=flip]``.

Reports accuracy (always named with its split, e.g. ``val (PublicTest)``, because FER2013 accuracies
are only comparable on the same split), per-class precision/recall/F1 and the confusion matrix, which
shows the classes the model mixes up (fear/sad, angry/disgust in FER2013). Files in ``--output_dir``,
prefixed with the split (and the TTA mode when one is used; suffixed ``_precise-bn`` after ``--precise_bn``,
``_network-only`` after ``--network_only``), so that one model's evaluations on several splits and TTAs share a
folder (another model's evaluation replaces them: give each model its own folder). ``--ensemble=A,B,...``
evaluates several models together instead: their probabilities averaged with equal weight, each model seeing its
own TTA views. ``--network_only`` runs each export as its network alone, without the views built into it, so
that ``--tta`` chooses the views of every model alike.

* ``SPLIT_metrics.json``: accuracy, per-class metrics, confusion counts and row-normalised rates,
  split, number of images, model path, TTA (requested, and any built into an export), whether exports ran as
  their network alone, and each member model (one for a single model);
* ``SPLIT_predictions.csv``: one row per image with its true and predicted class and probabilities;
* ``SPLIT_confusion_counts.png`` and ``SPLIT_confusion_normalized.png``: the confusion matrix;
* ``SPLIT_report.txt``: scikit-learn's classification report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from absl import flags

from fer_keras import CLASS_NAMES, NUM_CLASSES, __version__, cli
from fer_keras import data as fer_data
from fer_keras import tta as tta_lib
from fer_keras.errors import ConfigError, DataError
from fer_keras.history import check_creatable
from fer_keras.predict import PROBABILITY_COLUMNS, atomic_write
from fer_keras.tta import (
    DEFAULT_CROP_SIZE,
    ProbabilityModel,
    check_tta,
    effective_crop,
    model_crop_of,
    tta_probabilities,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_OUTPUT_DIR = "reports/evaluate"


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts ``[true, predicted]`` as int64 ``[num_classes, num_classes]``; rows are true classes."""
    labels = np.asarray(labels, np.int64).ravel()
    predictions = np.asarray(predictions, np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name}s must be class indices 0-{num_classes - 1}")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def normalize_rows(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall on the diagonal); rows of absent classes stay zero."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def most_confused(counts: np.ndarray) -> tuple[int, int, int] | None:
    """(true class, predicted class, count) of the most frequent error, or None without errors.

    Ranked by count rather than rate, so a class with one image cannot top the list by chance;
    ties go to the higher rate.
    """
    counts = np.asarray(counts)
    off = counts.astype(np.float64)
    np.fill_diagonal(off, 0)
    if off.max(initial=0) <= 0:
        return None
    rates = normalize_rows(counts)
    order = np.lexsort((-rates.ravel(), -off.ravel()))
    true, pred = divmod(int(order[0]), counts.shape[1])
    return true, pred, int(counts[true, pred])


@dataclasses.dataclass
class EvalResult:
    """Predictions of a model on a split and the metrics derived from them."""

    model: str
    model_kind: str
    export_tta: str | None
    split: str
    tta: str
    crop_size: int | None
    ids: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    predictions: np.ndarray
    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    report: str
    label: str | None = None  # how the split is named when not the source's own (a run's hold-out)
    precise_bn: str | None = None  # the images BatchNorm's statistics were re-estimated on (fer_keras.precise_bn)
    members: list[dict] = dataclasses.field(default_factory=list)  # each model averaged: path, kind, export TTA, crop

    @property
    def network_only(self) -> bool:
        """Exports ran as their network alone, without the views built into them."""
        return any(m.get("network_only") for m in self.members)

    @property
    def split_label(self) -> str:
        return self.label or fer_data.split_label(self.split)

    @property
    def num_images(self) -> int:
        return int(self.labels.size)

    @property
    def num_correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_images if self.num_images else 0.0

    @property
    def normalized_confusion(self) -> np.ndarray:
        return normalize_rows(self.confusion)

    @property
    def present_classes(self) -> np.ndarray:
        """Classes that occur as label or prediction: the ones macro averages are taken over."""
        return np.flatnonzero(self.confusion.sum(axis=0) + self.confusion.sum(axis=1))

    @property
    def macro_f1(self) -> float:
        present = self.present_classes
        return float(self.f1[present].mean()) if present.size else 0.0

    @property
    def weighted_f1(self) -> float:
        total = self.support.sum()
        return float((self.f1 * self.support).sum() / total) if total else 0.0

    def to_json(self) -> dict:
        pair = most_confused(self.confusion)
        rates = self.normalized_confusion
        return {
            "model": self.model,
            "model_kind": self.model_kind,
            "split": self.split,
            "split_label": self.split_label,
            "num_images": self.num_images,
            "tta": self.tta,
            "crop_size": self.crop_size,
            "export_tta": self.export_tta,
            "network_only": self.network_only,
            "members": self.members,
            "batchnorm_statistics": (f"re-estimated on {self.precise_bn}" if self.precise_bn
                                     else "the moving averages of training"),
            "accuracy": self.accuracy,
            "num_correct": self.num_correct,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "class_names": list(CLASS_NAMES),
            "per_class": {
                name: {
                    "precision": float(self.precision[i]),
                    "recall": float(self.recall[i]),
                    "f1": float(self.f1[i]),
                    "support": int(self.support[i]),
                }
                for i, name in enumerate(CLASS_NAMES)
            },
            "confusion_counts": self.confusion.tolist(),
            "confusion_normalized": np.round(rates, 6).tolist(),
            "most_confused": None if pair is None else {
                "true": CLASS_NAMES[pair[0]],
                "predicted": CLASS_NAMES[pair[1]],
                "count": pair[2],
                "rate": float(rates[pair[0], pair[1]]),
            },
            "fer_keras_version": __version__,
        }


def _check_labeled(split: fer_data.Split, where: str) -> None:
    if not len(split):
        raise DataError(f"{where}: no images")
    unlabeled = int((split.labels < 0).sum())
    if unlabeled:
        raise DataError(
            f"{where}: {unlabeled} of {len(split)} images have no label; evaluation needs labels "
            "(use python -m fer_keras.predict for unlabeled data)"
        )


def evaluate(
    predictor: ProbabilityModel,
    split: fer_data.Split,
    tta: str = "none",
    batch_size: int = 256,
    *,
    split_name: str,
    crop_size: int = DEFAULT_CROP_SIZE,
    split_label: str | None = None,
) -> EvalResult:
    """Runs ``predictor`` on a labeled split and computes the metrics.

    ``split_name`` is required so that no accuracy is ever reported without its split; ``split_label``
    names a split that is not the source's own (``val (10% stratified hold-out of train)``).
    """
    from sklearn.metrics import classification_report, precision_recall_fscore_support

    key = fer_data.canonical_split(split_name)
    check_tta(tta, crop_size)
    _check_labeled(split, split_label or fer_data.split_label(key))
    probabilities = tta_probabilities(predictor, split.images, tta, crop_size, batch_size)
    predictions = np.argmax(probabilities, axis=1).astype(np.int64)
    labels = np.asarray(split.labels, np.int64)
    classes = list(range(NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    present = sorted(set(labels.tolist()) | set(predictions.tolist()))
    report = classification_report(
        labels, predictions, labels=present, target_names=[CLASS_NAMES[c] for c in present],
        digits=3, zero_division=0,
    )
    members = [_member(m, tta, crop_size) for m in getattr(predictor, "members", None) or [predictor]]
    return EvalResult(
        model=str(getattr(predictor, "path", predictor)),
        model_kind=getattr(predictor, "kind", "model"),
        export_tta=members[0]["export_tta"] if len(members) == 1 else None,
        split=key,
        label=split_label,
        tta=tta,
        crop_size=effective_crop(crop_size, model_crop_of(predictor)) if tta == "tencrop" else None,
        members=members,
        ids=np.asarray(split.ids),
        labels=labels,
        probabilities=probabilities,
        predictions=predictions,
        confusion=confusion_matrix(labels, predictions),
        precision=np.asarray(precision, np.float64),
        recall=np.asarray(recall, np.float64),
        f1=np.asarray(f1, np.float64),
        support=np.asarray(support, np.int64),
        report=report,
    )


def _member(predictor: ProbabilityModel, tta: str, crop_size: int) -> dict:
    """What the metrics record of one model: its path, kind, the TTA built into it (exports), whether it ran as its
    network alone without those views, and its ten-crop side."""
    kind = getattr(predictor, "kind", "model")
    return {
        "model": str(getattr(predictor, "path", predictor)),
        "model_kind": kind,
        "export_tta": getattr(predictor, "metadata", {}).get("tta", "unknown") if kind == "saved_model" else None,
        "network_only": bool(getattr(predictor, "network_only", False)),
        "crop_size": effective_crop(crop_size, model_crop_of(predictor)) if tta == "tencrop" else None,
    }


def evaluate_precise_bn(
    model: str | Path | None,
    data: fer_data.FerData,
    split: fer_data.Split,
    tta: str = "none",
    batch_size: int = 256,
    *,
    split_name: str,
    crop_size: int = DEFAULT_CROP_SIZE,
    split_label: str | None = None,
    train: fer_data.Split | None = None,
) -> EvalResult:
    """:func:`evaluate` of ``model`` (as the tools resolve it) after its BatchNorm statistics are re-estimated on
    the Training images of ``data`` (:mod:`fer_keras.precise_bn`), or on ``train`` when the split is a run's
    hold-out (whose images must not be among them). An export is rebuilt as the Keras network it holds, without
    the test-time augmentation built around it, so ``tta`` chooses the views for every model alike (the export's
    own is recorded as ``export_tta``)."""
    from fer_keras import inference
    from fer_keras.precise_bn import reestimate

    check_tta(tta, crop_size)
    predictor = inference.load_predictor(model, network_only=True)
    train = data.split("train") if train is None else train
    reestimate(predictor.keras_model, train.images, batch_size, name=str(predictor.path))
    result = evaluate(predictor, split, tta, batch_size, split_name=split_name, crop_size=crop_size,
                      split_label=split_label)
    where = " without the run's hold-out" if split_label else ""
    return dataclasses.replace(result, precise_bn=f"{len(train):,} images of {fer_data.split_label('train')}{where}, "
                                                  "unaugmented")


def run_holdout(data: fer_data.FerData, split_name: str,
                models: Sequence[str | None]) -> tuple[fer_data.Split, fer_data.Split, str] | None:
    """``(train, val, label)`` of the run behind the one model in ``models`` when ``val`` is asked of data without a
    labelled val split (the course layout, image folders): the hold-out the run chose its epoch on, rebuilt from
    its recorded settings. None when the data has its own val split or no run is known.

    Refused when the model's record says it chose its epoch on another split (PublicTest: it may have trained on
    every image of the rebuilt hold-out) or on other images than those rebuilt (by their fingerprint), and for an
    ensemble, whose members may each have trained on another's hold-out."""
    from fer_keras import inference
    from fer_keras.history import data_fingerprints, read_data_record

    if fer_data.canonical_split(split_name) != "val" or fer_data.has_labelled_val(data):
        return None
    if len(models) != 1:
        raise ConfigError(f"{data.source}: has no labelled val split, and an ensemble is not scored on a hold-out of "
                          "train (each member may have trained on another's); give data with a PublicTest split")
    kind, path = inference.resolve(models[0])
    run_dir = inference.find_run_dir(models[0])
    if run_dir is not None:
        config = inference.training_config(kind, path, run_dir)
        try:
            record = read_data_record(run_dir)
        except OSError:
            record = None
        chose_on = record["val"].get("name") if record else None
    else:  # an export records all three in its metadata; a .keras file alone records none
        metadata = inference.export_metadata(path) if kind == "saved_model" else {}
        config = metadata.get("train_config")
        record, chose_on = metadata.get("data"), metadata.get("val_split")
    if not isinstance(config, dict) or not config:
        return None
    from fer_keras.train import run_splits_of

    if isinstance(chose_on, str) and "hold-out" not in chose_on:
        raise ConfigError(f"{path}: chose its epoch on {chose_on}, not on a hold-out of {data.source}; --split=val "
                          "there would score images it may have trained on (give data with a PublicTest split)")
    train, val, name = run_splits_of(data, config)
    fingerprints = data_fingerprints(record)
    if fingerprints and fingerprints[1] != val.fingerprint():
        raise ConfigError(f"{data.source}: its {name} differs from the images {path} chose its epoch on (data.json "
                          "fingerprints); pass the data the run was trained on")
    return train, val, f"val ({name} of train)"


def model_name(path: str, kind: str) -> str:
    """A short name for titles: ``NAME/VERSION`` for exports, ``RUN/best.keras`` for runs."""
    p = Path(path)
    if kind == "saved_model" or p.name == "best.keras":
        return f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    return p.name


def plot_confusion(
    matrix: np.ndarray,
    path: str | Path,
    title: str,
    normalized: bool = False,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Path:
    """Draws a confusion matrix (true classes down, predicted across) as an annotated PNG at ``path``."""
    from fer_keras.vis import save_figure

    return save_figure(confusion_figure(matrix, title, normalized, class_names), path)


def confusion_figure(
    matrix: np.ndarray,
    title: str,
    normalized: bool = False,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Figure:
    """The annotated confusion-matrix figure. Uses matplotlib's object API with the Agg canvas, so no display or
    pyplot state is involved."""
    from fer_keras.vis import new_figure

    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix has shape {matrix.shape}, expected ({n}, {n})")
    if normalized and not (matrix.min() >= 0.0 and matrix.max() <= 1.0 + 1e-9):
        raise ValueError("a normalised confusion matrix holds fractions of each true class (0-1), not counts")
    fig = new_figure(7.5, 6.5, dpi=120)
    ax = fig.add_subplot()
    vmax = 1.0 if normalized else max(float(matrix.max()), 1.0)
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=vmax)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("fraction of the true class" if normalized else "images")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(n):
        for j in range(n):
            value = matrix[i, j]
            text = f"{value:.2f}" if normalized else f"{int(value)}"
            colour = "white" if value > 0.5 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _title(result: EvalResult, normalized: bool) -> str:
    tta = "" if result.tta == "none" else f", tta {result.tta}"
    if result.export_tta not in (None, "none"):
        tta += f", export tta {result.export_tta}" + (" left out" if result.network_only else "")
    name = model_name(result.model, result.model_kind)
    if result.model_kind == "ensemble":
        names = [model_name(m["model"], m["model_kind"]) + _built_in_note(m) for m in result.members]
        name = " + ".join(names)
        name = " +\n".join(names) if len(name) > 80 else name  # one line per member when one line overflows
        tta += f", mean of {len(result.members)} models"
    kind = "row-normalised" if normalized else "counts"
    return (
        f"{name} on {result.split_label}\n"
        f"accuracy {result.accuracy:.2%} of {result.num_images} images{tta} ({kind})"
    )


def _built_in_note(member: dict, left_out: bool = True) -> str:
    """`` (flip)`` after an ensemble member that averages views itself, `` (flip left out)`` when it ran as its
    network alone (``left_out=False`` where the sentence says so already); nothing for a member without
    built-in views. The title and the summary both name members this way."""
    if member["export_tta"] in (None, "none"):
        return ""
    return f" ({member['export_tta']}{' left out' if left_out and member['network_only'] else ''})"


def predictions_csv(result: EvalResult) -> str:
    """One row per image: its id (row of the source), true and predicted class, and the probabilities."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label", "label_name", "predicted", "predicted_name", "correct", *PROBABILITY_COLUMNS])
    for row_id, label, pred, probs in zip(result.ids, result.labels, result.predictions, result.probabilities):
        writer.writerow([
            str(row_id), int(label), CLASS_NAMES[label], int(pred), CLASS_NAMES[pred], int(label == pred),
            *(f"{p:.6f}" for p in probs),
        ])
    return buffer.getvalue()


def write_report(result: EvalResult, output_dir: str | Path, source: str | None = None) -> dict[str, Path]:
    """Writes the JSON, CSV, PNGs and text report; returns their paths by kind.

    Everything is drawn and formatted before the first file is written, and each file replaces its old version
    atomically, so a rerun stopped part-way mixes old and new files only within milliseconds of writing; the
    metrics JSON, which lists the set, comes last.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    stem = result.split if result.tta == "none" else f"{result.split}_tta-{result.tta}"
    stem += "_precise-bn" if result.precise_bn else "_network-only" if result.network_only else ""
    files = {
        "json": out / f"{stem}_metrics.json",
        "csv": out / f"{stem}_predictions.csv",
        "png_counts": out / f"{stem}_confusion_counts.png",
        "png_normalized": out / f"{stem}_confusion_normalized.png",
        "report": out / f"{stem}_report.txt",
    }
    from fer_keras.vis import png_bytes

    header = f"{result.model} on {result.split_label}, tta {result.tta}\naccuracy {result.accuracy:.4f}\n\n"
    payload = result.to_json()
    payload["data"] = source
    payload["files"] = {kind: path.name for kind, path in files.items() if kind != "json"}
    contents = {
        "png_counts": png_bytes(confusion_figure(result.confusion, _title(result, False), normalized=False)),
        "png_normalized": png_bytes(confusion_figure(result.normalized_confusion, _title(result, True),
                                                     normalized=True)),
        "csv": predictions_csv(result),
        "report": header + result.report,
        "json": _dump_json(payload),
    }
    for path in files.values():  # before the first write: a folder in the way of the last left a mixed set
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory, expected an output file name; choose another --output_dir")
    for kind, content in contents.items():
        atomic_write(files[kind], content)
    return files


def _dump_json(payload: dict) -> str:
    """Indented JSON with each matrix row on one line, so the confusion matrix reads as a table."""
    matrices = {key: payload[key] for key in ("confusion_counts", "confusion_normalized")}
    text = json.dumps({**payload, **{key: f"@{key}@" for key in matrices}}, indent=2)
    for key, rows in matrices.items():
        body = ",\n    ".join(json.dumps(row) for row in rows)
        text = text.replace(f'"@{key}@"', f"[\n    {body}\n  ]")
    return text + "\n"


def summary(result: EvalResult) -> str:
    """Three lines: the model, accuracy with its split, and the most confused pair."""
    built_in = ""
    if result.export_tta not in (None, "none"):
        built_in = (f"; its network alone, without the {result.export_tta} views the export averages"
                    if result.network_only else f"; the export averages {result.export_tta} views itself")
    if result.precise_bn:
        built_in += f"; BatchNorm statistics re-estimated on {result.precise_bn}"
    if result.model_kind == "ensemble":
        own = [model_name(m["model"], m["model_kind"]) + _built_in_note(m, left_out=False) for m in result.members
               if m["export_tta"] not in (None, "none")]
        where = ("each export's network alone, without the views it serves with" if result.network_only
                 else "views built into the exports")
        built_in = ", probabilities averaged" + (f"; {where}: {', '.join(own)}" if own else "")
        model = f"ensemble of {len(result.members)}: {result.model}"
    else:
        model = f"{result.model_kind} {result.model}"
    lines = [
        f"model: {model}{built_in}",
        f"{result.split_label}: accuracy {result.accuracy:.2%} ({result.num_correct}/{result.num_images} images), "
        f"macro F1 {result.macro_f1:.3f}, tta {result.tta}",
    ]
    pair = most_confused(result.confusion)
    if pair is None:
        lines.append("most confused: none (no errors)")
    else:
        true, pred, count = pair
        rate = result.normalized_confusion[true, pred]
        lines.append(
            f"most confused: {CLASS_NAMES[true]} -> {CLASS_NAMES[pred]} "
            f"({count} images, {rate:.1%} of {CLASS_NAMES[true]})"
        )
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A .keras file, a training run directory or a SavedModel export "
                        "(default: the shipped saved_models/fer_resnet18).")
    flags.DEFINE_list("ensemble", [], "Instead of --model: two or more models, comma-separated, evaluated as one by "
                      "their probabilities averaged with equal weight; --tta applies to each, and an export averages "
                      "the views built into it.")
    flags.register_validator("ensemble", lambda v: len(v) != 1 and all(v),
                             "--ensemble needs two or more models, comma-separated (one model: --model)")
    flags.DEFINE_string("data", None, "FER2013 source: fer2013.csv[.gz], train.csv, an image folder "
                        "(default: the bundled sample).")
    flags.DEFINE_string("split", "val", "Labeled split to evaluate: train, val (PublicTest) or test (PrivateTest).")
    tta_lib.define_flags()
    cli.define_skip_bad_rows()
    flags.DEFINE_bool("precise_bn", False, "Re-estimate every BatchNorm layer's moving mean and variance on the "
                      "Training images of --data, unaugmented, before evaluating (precise BatchNorm: statistics of "
                      "clean faces instead of the moving averages over augmented training batches). An export is "
                      "rebuilt as its network alone, so --tta applies to it too; files get the suffix _precise-bn.")
    flags.DEFINE_bool("network_only", False, "Run each export as its network alone, rebuilt without the test-time "
                      "augmentation built into it, so that --tta chooses the views of every model alike (ten-crop "
                      "for an export served with flip; one view set across an ensemble of exports built with "
                      "different ones). No effect on .keras models; the files of an export so run get the suffix "
                      "_network-only.")
    flags.DEFINE_string("output_dir", DEFAULT_OUTPUT_DIR, "Folder for the metrics JSON, predictions CSV, "
                        "confusion-matrix PNGs and text report, named by split and TTA: one folder per model.")
    flags.register_validator("output_dir", lambda v: bool(v), "--output_dir must not be empty")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    split_name = fer_data.canonical_split(f.split)
    check_tta(f.tta, f.crop_size)
    check_creatable(f.output_dir, "--output_dir", folder=True)
    from fer_keras import inference

    if f.ensemble and f["model"].present:
        raise ConfigError("--model and --ensemble both given; name the models of an ensemble in --ensemble only")
    if f.ensemble and f.precise_bn:
        raise ConfigError("--precise_bn re-estimates one model's statistics; it does not take --ensemble")
    models = f.ensemble or [f.model]
    inference.resolve_all(models)  # a missing or repeated model fails before the data is read
    data = fer_data.load(f.data or None, skip_bad_rows=f.skip_bad_rows)
    holdout = run_holdout(data, split_name, models)
    if holdout is None:
        split, label, train = data.split(split_name), None, None
    else:
        train, split, label = holdout
    _check_labeled(split, f"{data.source}: {label or fer_data.split_label(split_name)}")
    if f.precise_bn:
        result = evaluate_precise_bn(models[0], data, split, f.tta, f.batch_size, split_name=split_name,
                                     crop_size=f.crop_size, split_label=label, train=train)
    else:
        predictor = (inference.load_predictor(models[0], f.network_only) if len(models) == 1
                     else inference.load_ensemble(models, f.network_only))
        result = evaluate(predictor, split, f.tta, f.batch_size, split_name=split_name, crop_size=f.crop_size,
                          split_label=label)
    files = write_report(result, Path(f.output_dir), source=data.source)
    print(summary(result))
    print(f"wrote {files['json']} and {', '.join(p.name for k, p in files.items() if k != 'json')}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
