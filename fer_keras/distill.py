"""Knowledge distillation: training targets softened by trained teachers (``train --teachers``).

The soft target is ``(1 - weight) * one_hot(label) + weight * teacher``, where ``teacher`` is the mean of the
teachers' probabilities, each averaged over test-time augmentation views (an export's own built-in TTA, else
``--teacher_tta``) and sharpened or softened by a temperature. The training loss then smooths it as it smooths a
one-hot label: with ``--label_smoothing`` s the cross-entropy's target is ``(1 - s) * soft_target + s / 7``, so
with every recipe's s = 0.1 the student learns from ``0.9 * [(1 - w) * one_hot + w * teacher] + 0.1 / 7``: the
teachers' share is 0.9 w, not w, and every class gets 1/70 more. That is the recipe that made version 8 (w = 0.5:
0.45 label, 0.45 teachers, 0.1 spread over the 7 classes), kept rather than changed. FER2013's labels are noisy
and its classes overlap (fear and sad, angry and disgust); a teacher's probabilities say by how much for each face,
which a one-hot label cannot.

The teachers' probabilities are computed once, on the un-augmented training images, and kept in the run
directory (``teacher_targets.npz``; ``teachers.json`` records which models they came from). Online
distillation, a teacher forward pass on every augmented batch, would add per teacher roughly a third of a training
step's arithmetic (a forward pass of the three a step makes: forward, and backward for activations and weights),
hours over a 100-epoch run on a CPU; a pass over the training images with flip took about 3 minutes per teacher
here (README, Results). The augmentation here (shifts, small rotations, flips, erasing) keeps a
face's expression, so one target per image serves all its augmented views. Mixup mixes the soft targets as it
mixes labels.

A resumed run reuses its stored targets, so a teacher path that now names another model (``saved_models/NAME``
resolves to its highest version) does not change a run midway. A new run reuses any teacher's probabilities that an
earlier run computed on the same training images with the same views: each teacher's are also kept in the cache
(``$FER_KERAS_CACHE/teachers``, as parsed data are; ``--nouse_cache`` skips it), keyed by the model's SHA-256, the
views and the training images' fingerprint, so a second distillation from the same teachers skips their pass (ten
minutes for four teachers with flip on FER2013 here) without copying files between run folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from absl import logging

from fer_keras import NUM_CLASSES
from fer_keras.errors import ConfigError, FerError, ModelError
from fer_keras.history import NPZ_ERRORS, atomic_write_text, open_npz

if TYPE_CHECKING:
    from fer_keras.data import FerData, Split

TARGETS_FILE = "teacher_targets.npz"
RECORD_FILE = "teachers.json"
BATCH_SIZE = 256
CACHE_FOLDER = "teachers"  # under fer_keras.data.cache_dir()


@dataclasses.dataclass
class Teachers:
    """The teachers' probabilities ``[K, N, 7]`` on a training split and their records (path, SHA-256, ...)."""

    probabilities: np.ndarray
    records: list[dict]
    fingerprint: str  # of the training split they were computed on
    tta: str  # the views of teachers without TTA of their own

    def targets(self, labels: np.ndarray, weight: float, temperature: float) -> np.ndarray:
        return soft_targets(labels, self.probabilities, weight, temperature)


def soften(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``p ** (1 / T)`` renormalised (T > 1 softer, T < 1 sharper). For the probabilities of one view that is the
    softmax of its logits divided by ``T``; for probabilities averaged over TTA views (what is stored) it is not, as
    the views' logits are gone."""
    if temperature <= 0:
        raise ConfigError(f"distill_temperature must be > 0, got {temperature:g}")
    logp = np.log(np.clip(np.asarray(probabilities, np.float64), 1e-30, None)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=-1, keepdims=True)


def soft_targets(labels: np.ndarray, probabilities: np.ndarray, weight: float, temperature: float = 1.0) -> np.ndarray:
    """float32 ``[N, 7]`` rows summing to 1: the one-hot labels mixed with the teachers' mean (softened)
    probabilities. ``probabilities`` is ``[K, N, 7]`` (K teachers) or ``[N, 7]``.

    These are the targets before the loss's label smoothing (and mixup, which mixes them): training's
    cross-entropy with ``label_smoothing`` s fits ``(1 - s) * targets + s / 7``, the same smoothing one-hot labels get.
    """
    if not 0 <= weight <= 1:
        raise ConfigError(f"distill_weight must be in [0, 1], got {weight:g}")
    probs = np.asarray(probabilities, np.float64)
    if probs.ndim == 2:
        probs = probs[None]
    labels = np.asarray(labels)
    if probs.ndim != 3 or probs.shape[1:] != (len(labels), NUM_CLASSES):
        raise ConfigError(f"teacher probabilities of shape {list(probs.shape)} do not fit {len(labels)} labels of "
                          f"{NUM_CLASSES} classes")
    teacher = soften(probs, temperature).mean(axis=0)
    one_hot = np.eye(NUM_CLASSES)[labels]
    return ((1.0 - weight) * one_hot + weight * teacher).astype(np.float32)


def describe_teacher(path: str) -> dict:
    """What ``teachers.json`` keeps of one teacher: the model it resolved to, its SHA-256 (of the ``.keras`` file
    or the export's variables), the TTA built into it, what its run selected it on, and what is known of that run
    (epochs, wall time, flags, what it started from: ``run``), so the student's card can say how its teachers
    were made and what they cost."""
    from fer_keras import inference

    try:
        kind, resolved = inference.resolve(path)
        record: dict = {"given": path, "path": str(resolved.resolve()), "kind": kind,
                        "sha256": inference.model_sha256(kind, resolved)}
    except ModelError as e:
        raise ConfigError(f"--teachers: {e}") from None
    meta, run = _teacher_run(kind, resolved)
    record["tta"] = (meta.get("tta") or "none") if kind == "saved_model" else "none"
    if record["tta"] == "tencrop":  # its views are those of its own crop side
        record["crop_size"] = meta.get("crop_size")
    record.update({k: meta.get(k) for k in ("val_split", "val_accuracy", "best_epoch", "data")})
    record["run"] = run
    return record


def teacher_run(record: dict) -> dict | None:
    """What is known now of the run that trained a ``teachers.json`` record's model (for a record written before
    ``run`` was kept), when its path still holds the same model (SHA-256); else None."""
    from fer_keras import inference

    try:
        kind, resolved = inference.resolve(record["path"])
        if inference.model_sha256(kind, resolved) != record.get("sha256"):
            return None
    except (ModelError, OSError):
        return None
    return _teacher_run(kind, resolved)[1]


def _teacher_run(kind: str, resolved: Path) -> tuple[dict, dict | None]:
    """A resolved teacher's export or run metadata, and the record of its run (None for a bare ``.keras`` file)."""
    from fer_keras import inference
    from fer_keras.history import run_record
    from fer_keras.model_card import export_start_run

    if kind == "saved_model":
        meta = inference.export_metadata(resolved)
        return meta, export_start_run(resolved, meta)
    if resolved.name != "best.keras":
        return {}, None
    from fer_keras.export import run_metadata

    return run_metadata(resolved.parent), run_record(resolved.parent)


def compute(teachers: Sequence[str] | Sequence[dict], images: np.ndarray, labels: np.ndarray, fingerprint: str,
            tta: str = "flip", batch_size: int = BATCH_SIZE) -> Teachers:
    """Runs every teacher (a path, or its :func:`describe_teacher` record) over ``images`` (uint8
    ``[N, 48, 48, 1]``), with the TTA built into it or, for a model without, ``tta``; the records gain the TTA used
    and each teacher's accuracy on these (un-augmented) training images."""
    from fer_keras import inference
    from fer_keras.tta import tta_probabilities

    # Every path checked before the first long pass.
    records = [dict(t) if isinstance(t, dict) else describe_teacher(t) for t in teachers]
    print(f"running {len(records)} teacher(s) over {len(images):,} training images (once per run)", flush=True)
    probs = []
    for i, record in enumerate(records, start=1):
        start = time.perf_counter()
        try:
            predictor = inference.load_predictor(record["path"])
        except ModelError as e:
            raise ConfigError(f"--teachers: {e}") from None
        views = tta if record["tta"] == "none" else "none"  # an export's own TTA is not augmented again
        p = tta_probabilities(predictor, images, views, batch_size=batch_size)
        if views != "none":
            record["tta"] = views
        if p.shape != (len(images), NUM_CLASSES) or not np.isfinite(p).all():
            raise ConfigError(f"--teachers: {record['path']}: gave probabilities of shape {list(p.shape)}"
                              f"{'' if np.isfinite(p).all() else ' with non-finite values'} for {len(images)} images")
        probs.append(p.astype(np.float32))
        record["train_accuracy"] = float(np.mean(p.argmax(axis=1) == labels))
        seconds = time.perf_counter() - start
        print(f"teacher {i}/{len(records)} {record['path']} (TTA {record['tta']}): {len(images):,} training images "
              f"in {seconds:.0f} s, accuracy on them {record['train_accuracy']:.1%}", flush=True)
    return Teachers(np.stack(probs), records, fingerprint, tta)


def save(folder: Path, teachers: Teachers) -> None:
    """``teacher_targets.npz`` (probabilities and the training split's fingerprint) and ``teachers.json``,
    each written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=teachers.probabilities, fingerprint=np.array(teachers.fingerprint),
                        sha256=np.array([r["sha256"] for r in teachers.records]), tta=np.array(teachers.tta))
    atomic_write_text(folder / TARGETS_FILE, buffer.getvalue())
    atomic_write_text(folder / RECORD_FILE, json.dumps(teachers.records, indent=2) + "\n")


def load(folder: Path) -> Teachers | None:
    """The stored teachers of a run, or None when they are missing or unreadable (then computed afresh)."""
    try:
        with open_npz(folder / TARGETS_FILE) as f:
            probabilities, fingerprint, tta = f["probabilities"], str(f["fingerprint"]), str(f["tta"])
            sha = [str(s) for s in f["sha256"]]
        records = json.loads((folder / RECORD_FILE).read_text())
    except FileNotFoundError:
        return None
    except (*NPZ_ERRORS, zlib.error) as e:  # its arrays are compressed: a damaged stream too
        logging.warning("%s: unreadable (%s); the teachers' probabilities are computed again", folder / TARGETS_FILE,
                        e)
        return None
    if (not isinstance(records, list) or len(records) != len(sha) or probabilities.ndim != 3
            or [r.get("sha256") if isinstance(r, dict) else None for r in records] != sha):
        logging.warning("%s and %s do not match; the teachers' probabilities are computed again",
                        folder / TARGETS_FILE, RECORD_FILE)
        return None
    return Teachers(probabilities, records, fingerprint, tta)


def hold_out_risk(record: dict, val_split: str, val_fraction: float | None = None,
                  seed: int | None = None, data: dict | None = None, dataset: FerData | None = None,
                  selection: Split | None = None) -> str | None:
    """Why the teacher of a :func:`describe_teacher` record may have trained on images a student selecting on
    ``val_split`` holds out, or None when its record shows it did not.

    A hold-out of Training is named by its fraction alone, so a teacher's of the same name may still hold out
    other images: another ``seed``, a fraction that rounds to the same percentage, or another data file. When
    both the teacher's record and the student's ``data`` (its ``data.json`` record) hold image fingerprints, they
    decide: the teacher did not train on the student's hold-out when it selected on those very images or trained
    on the student's very training images. Runs that differ in ``--max_*_examples`` fingerprint other subsets of
    the same splits: given the student's ``dataset`` and ``selection`` images, the teacher's recorded settings
    rebuild its training images from them, and when those are the very images its fingerprints name, the teacher
    is a risk only if it trained on one of ``selection``. Else the fraction and seed its run recorded are compared.
    Whatever the record does not say (the teacher's split, how its hold-out was drawn, what the weights it started
    from were trained on) counts as a risk: a warning too many costs less than a selection split the student has
    seen through its teacher.
    """
    from fer_keras.history import data_fingerprints, unrecorded_start
    from fer_keras.train import TrainConfig

    teacher_split = record.get("val_split")
    if not teacher_split:
        return "the split it was selected on is not recorded"
    if teacher_split != val_split:
        return f"it was selected on {teacher_split}, this run selects on {val_split}"
    if val_split == "PublicTest":  # a fixed split of the data, never trained on
        return None
    run = record.get("run") if isinstance(record.get("run"), dict) else {}
    config = TrainConfig.recorded(run["config"]) if isinstance(run.get("config"), dict) else None
    theirs, ours = data_fingerprints(record.get("data")), data_fingerprints(data)
    if theirs and ours:
        if theirs[0] != ours[0] and theirs[1] != ours[1]:
            seen = _selection_trained_on(config, theirs, dataset, selection)
            if seen is None:
                source = record["data"].get("source")
                return (f"its training and {teacher_split} images (of {source}) are, by their fingerprints, neither "
                        f"this run's training nor its {val_split} images")
            if seen:
                return f"it trained on {seen} of the {len(selection)} images of this run's {val_split}"
    elif config is None or val_fraction is None or seed is None:
        return f"how its {teacher_split} was drawn (fraction and seed) is not recorded"
    elif (config["val_fraction"], config["seed"]) != (val_fraction, seed):
        return (f"its {teacher_split} was drawn with fraction {config['val_fraction']:g} and seed {config['seed']}, "
                f"this run's with fraction {val_fraction:g} and seed {seed}")
    start = run.get("init") or (unrecorded_start(config) if config else None)
    if start:
        return f"it started from other weights ({start.get('path')}), whose training images are not known"
    return None


def _selection_trained_on(config: dict | None, fingerprints: tuple[str, str], dataset: FerData | None,
                          selection: Split | None) -> int | None:
    """How many ``selection`` images a teacher trained on, when its recorded settings rebuild from ``dataset`` the
    very training and selection images its ``fingerprints`` name; None when they do not (other data, other rows
    skipped) or there is nothing to rebuild from."""
    if config is None or dataset is None or selection is None:
        return None
    from fer_keras.train import run_splits_of

    try:
        trained, selected, _ = run_splits_of(dataset, config)
    except FerError:  # its hold-out cannot be drawn from these images: not its data
        return None
    if (trained.fingerprint(), selected.fingerprint()) != fingerprints:
        return None
    return int(np.isin(selection.ids, trained.ids).sum())


def prepare(folder: Path, teachers: Sequence[str] | Sequence[dict], images: np.ndarray, labels: np.ndarray,
            fingerprint: str, started: bool, val_split: str, tta: str = "flip",
            batch_size: int = BATCH_SIZE, *, val_fraction: float | None = None,
            seed: int | None = None, data: dict | None = None, dataset: FerData | None = None,
            selection: Split | None = None, use_cache: bool = True) -> tuple[Teachers, bool]:
    """The teachers (paths, or their :func:`describe_teacher` records) of a run whose outputs go to ``folder``:
    stored ones that fit, else each teacher's from the cache (``use_cache``) or computed now. Returns
    ``(teachers, fresh)``; ``fresh`` when not the run's own (the caller saves them once the run is under way).
    Teachers that may have trained on the run's selection split (``val_split``; for a hold-out, drawn with
    ``val_fraction`` and ``seed``, the images ``data``, the run's ``data.json`` record, fingerprints; the
    ``dataset`` and ``selection`` images it was drawn from) are warned about (:func:`hold_out_risk`).

    A run that has started keeps the probabilities it started with; when they are lost, the teachers must still
    be the same models (same SHA-256), or the run would change targets midway. A run that has not started
    reuses stored probabilities only for the same models, views and training images.
    """
    stored = load(folder)
    fits = stored is not None and stored.fingerprint == fingerprint and stored.tta == tta and (
        stored.probabilities.shape[:2] == (len(teachers), len(images)))
    if fits and started:
        _fill_cache(stored, use_cache)
        return stored, False
    teachers = [t if isinstance(t, dict) else describe_teacher(t) for t in teachers]
    if fits and [r["sha256"] for r in stored.records] == [t["sha256"] for t in teachers]:
        _fill_cache(stored, use_cache)
        return stored, False
    if started:
        _check_started_with(folder, teachers)
    found = {i: hit for i, t in enumerate(teachers)
             if use_cache and (hit := cache_lookup(t, tta, fingerprint, len(images))) is not None}
    missing = [t for i, t in enumerate(teachers) if i not in found]
    computed = iter(())
    if missing:
        fresh = compute(missing, images, labels, fingerprint, tta, batch_size)
        if use_cache:
            for described, record, p in zip(missing, fresh.records, fresh.probabilities):
                cache_store({**described, "train_accuracy": record["train_accuracy"]}, tta, fingerprint, p)
        computed = zip(fresh.records, fresh.probabilities)
    records, probabilities = [], []
    for i in range(len(teachers)):
        if i in found:
            record, p = found[i]
            print(f"teacher {i + 1}/{len(teachers)} {record['path']} (TTA {record['tta']}): its probabilities of the "
                  f"{len(images):,} training images from the cache ({record['cached']})", flush=True)
        else:
            record, p = next(computed)
        records.append(record)
        probabilities.append(p)
    for record in records:
        risk = hold_out_risk(record, val_split, val_fraction, seed, data, dataset, selection)
        if risk:
            logging.warning("teacher %s: %s: the teacher may have trained on images this run holds out",
                            record["path"], risk)
    return Teachers(np.stack(probabilities).astype(np.float32), records, fingerprint, tta), True


def _fill_cache(stored: Teachers, use_cache: bool) -> None:
    """Puts a run's stored probabilities into the cache where it lacks them (runs made before it, or a cache that
    was cleared), so that the next run distilled from those teachers finds them. Its records' ``tta`` are the views
    each was computed with."""
    if not use_cache:
        return
    for record, probabilities in zip(stored.records, stored.probabilities):
        if "train_accuracy" in record and not cache_path(record, record["tta"], stored.fingerprint).is_file():
            cache_store(record, record["tta"], stored.fingerprint, probabilities)


def _views(record: dict, tta: str) -> str:
    """The views a teacher is run with: an export's built-in TTA (ten-crop with its crop side, which the model
    does not fix), else ``tta``."""
    if record.get("tta", "none") == "none":
        return tta
    return f"tencrop{record['crop_size']}" if record["tta"] == "tencrop" and record.get("crop_size") else record["tta"]


def cache_path(record: dict, tta: str, fingerprint: str) -> Path:
    """Where the cache keeps one teacher's probabilities: a file per model (SHA-256), views and training images."""
    from fer_keras.data import cache_dir

    key = hashlib.sha256(f"{record['sha256']}|{_views(record, tta)}|{fingerprint}".encode()).hexdigest()[:32]
    return cache_dir() / CACHE_FOLDER / f"{key}.npz"


def cache_store(record: dict, tta: str, fingerprint: str, probabilities: np.ndarray) -> None:
    """Keeps one teacher's probabilities, computed by :func:`compute` from its :func:`describe_teacher` ``record``
    (with the ``train_accuracy`` it found) with ``tta``; a cache that cannot be written is warned about, never an
    error."""
    path = cache_path(record, tta, fingerprint)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=np.asarray(probabilities, np.float32), sha256=np.array(record["sha256"]),
                        views=np.array(_views(record, tta)), fingerprint=np.array(fingerprint),
                        train_accuracy=np.array(record["train_accuracy"]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, buffer.getvalue())
    except OSError as e:
        logging.warning("could not write the teachers' cache %s (%s); continuing without it", path, e)


def cache_lookup(record: dict, tta: str, fingerprint: str, count: int) -> tuple[dict, np.ndarray] | None:
    """A teacher's cached probabilities of ``count`` training images (``fingerprint``) with its views, and its
    record completed as :func:`compute` completes it; None when not cached or unreadable (a cache is disposable:
    it is computed again)."""
    path = cache_path(record, tta, fingerprint)
    if not path.is_file():
        return None
    try:
        with open_npz(path) as f:
            probabilities = np.asarray(f["probabilities"], np.float32)
            keys = (str(f["sha256"]), str(f["views"]), str(f["fingerprint"]))
            accuracy = float(f["train_accuracy"])
    except (*NPZ_ERRORS, zlib.error) as e:
        logging.warning("ignoring the unreadable teachers' cache %s (%s)", path, e)
        return None
    if keys != (record["sha256"], _views(record, tta), fingerprint) or probabilities.shape != (count, NUM_CLASSES) or (
            not np.isfinite(probabilities).all()):
        logging.warning("ignoring the teachers' cache %s: it holds other probabilities", path)
        return None
    views = tta if record.get("tta", "none") == "none" else record["tta"]
    return {**record, "tta": views, "train_accuracy": accuracy, "cached": str(path)}, probabilities


def _check_started_with(folder: Path, teachers: Sequence[dict]) -> None:
    """Refuses, before the long teacher pass, teachers other than those a started run recorded in
    ``teachers.json`` (its targets are lost: computing them from other models would change them midway)."""
    try:
        recorded = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(recorded, list):
        return
    before = [r.get("sha256") if isinstance(r, dict) else None for r in recorded]
    changed = [t["path"] for t, b in zip(teachers, before) if t["sha256"] != b]
    if changed or len(before) != len(teachers):
        raise ConfigError(f"{folder / TARGETS_FILE} is missing or unreadable and the teachers are not the models "
                          f"the run started with ({', '.join(changed) or 'their number'} changed): the run would "
                          "change its targets midway; restore the teachers or use a new --model_dir")


def same_paths(old: Sequence[str] | None, new: Sequence[str] | None) -> bool:
    """The same teachers, however their paths are spelled."""
    return [os.path.abspath(p) for p in old or []] == [os.path.abspath(p) for p in new or []]
