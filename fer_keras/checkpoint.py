"""Resumable training state: atomic checkpoints and the callbacks that write them every epoch.

A checkpoint is ``checkpoints/epoch_NNNN/`` holding ``model.weights.h5`` (weights and optimizer state),
``state.json`` (epoch, best validation accuracy, full history, dropout RNG state, the other files' sizes and
SHA-256) and, with weight averaging, ``average.npz`` (the running mean of the weights and how many epochs it
holds). It is written to a temporary folder and renamed into place, so a kill at any moment leaves complete
checkpoints only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
from absl import logging

from fer_keras import __version__
from fer_keras.averaging import WeightAverage
from fer_keras.errors import ConfigError, FerError
from fer_keras.history import (
    atomic_write_text,
    best_row,
    fsync_path,
    plot_history,
    read_history_csv,
    remove_dead_writers_tmp,
    sha256_files,
    tmp_name,
    write_history_csv,
)

CHECKPOINTS_KEPT = 2
_EPOCH_FOLDER = re.compile(r"epoch_([0-9]{4,})")


def epoch_folders(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders ``epoch_NNNN`` in epoch order; anything else a user keeps there (a copy named
    ``epoch_0001.keep``, an archive ``epoch_0001.tar``) is neither resumed from nor pruned."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("epoch_*")
             if (m := _EPOCH_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _state_problem(folder: Path, state: object) -> str | None:
    """What is wrong with a parsed state.json, or None: a resume reads these fields blind."""
    if not isinstance(state, dict):
        return "not a JSON object"
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or folder.name != f"epoch_{epoch:04d}":
        return f"its epoch {epoch!r} is not the folder's"
    if not isinstance(state.get("history"), list) or not all(isinstance(r, dict) for r in state["history"]):
        return "no history list"
    if not isinstance(state.get("best_epoch"), int) or not isinstance(state.get("best_val_accuracy"), (int, float)):
        return "no best epoch"
    files = state.get("files", {})  # checkpoints written before session 40 record none
    if not isinstance(files, dict):
        return "no file list"
    for name, written in files.items():
        if not isinstance(written, dict) or not isinstance(written.get("bytes"), int):
            return f"a damaged file list ({name})"
        path = folder / name
        if not path.is_file():
            return f"no {name}"
        size = path.stat().st_size
        if size != written["bytes"]:
            return f"{name} is {size:,} bytes, {written['bytes']:,} when written (cut short or overwritten)"
        if sha256_files([path]) != written.get("sha256"):
            return f"{name} has changed since it was written (its SHA-256 differs)"
    return None


def latest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint, or None. A folder whose state.json is missing, cut or damaged, or whose
    files differ in size or hash from what state.json recorded (a copy gone wrong: the writer renames complete
    folders only), is skipped with a warning naming it; one that cannot be read for another reason (permissions,
    I/O) stops with a one-line error rather than resuming from an older epoch."""
    if not ckpt_dir.is_dir():
        return None
    for folder in reversed(epoch_folders(ckpt_dir)):
        state_file = folder / "state.json"
        try:
            state = json.loads(state_file.read_text())
            problem = None if (folder / "model.weights.h5").is_file() else "no model.weights.h5"
            problem = problem or _state_problem(folder, state)
        except (FileNotFoundError, ValueError) as e:
            problem = f"unreadable state.json ({type(e).__name__})"
        except OSError as e:
            raise ConfigError(f"{e.filename or state_file}: cannot be read ({e.strerror or e}); fix it or move the "
                              "folder away to resume from the epoch before") from None
        if problem is None:
            return folder, state
        logging.warning("%s: skipped, %s; resuming from an earlier checkpoint", folder, problem)
    return None


def rng_variables(model: keras.Model) -> list[keras.Variable]:
    """Dropout's seed-generator states: variables of the model that ``save_weights`` leaves out."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def restore_rng(model: keras.Model, saved: dict[str, list]) -> int:
    """Assigns a checkpoint's seed-generator states to ``model``; returns how many were restored. Keras numbers
    seed generators per process (``seed_generator_2/...`` when two models with Dropout were built before), so a
    checkpoint written by a process that built other models first names them differently: they are matched by
    position when count and shapes agree, else by path."""
    variables = rng_variables(model)
    values = [np.asarray(v) for v in saved.values()]
    if len(values) == len(variables) and all(a.shape == tuple(v.shape) for a, v in zip(values, variables)):
        pairs = list(zip(variables, values))
    else:
        pairs = [(v, np.asarray(saved[v.path])) for v in variables if v.path in saved]
    for variable, value in pairs:
        variable.assign(value.astype(variable.dtype))
    return len(pairs)


def write_checkpoint(model: keras.Model, ckpt_dir: Path, state: dict,
                     extra: Callable[[Path], None] | None = None) -> Path:
    """Weights (with optimizer state) + run state, and whatever ``extra`` writes into the folder (the weight
    average), renamed into place only when complete."""
    epoch = state["epoch"]
    state = {**state, "rng_state": {v.path: np.asarray(v.numpy()).tolist() for v in rng_variables(model)}}
    final = ckpt_dir / f"epoch_{epoch:04d}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_tmp(ckpt_dir)
    tmp = ckpt_dir / tmp_name(f"epoch_{epoch:04d}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_weights(str(tmp / "model.weights.h5"))
    fsync_path(tmp / "model.weights.h5")
    if extra is not None:
        extra(tmp)
    # A copy cut short (a full disk, an interrupted rsync) keeps its name: the sizes and hashes tell.
    state["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_files([p])}
                      for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    fsync_path(tmp)
    if final.exists():  # rewritten: move the old one aside first, so a kill never leaves half of it in place
        old = ckpt_dir / tmp_name(f"old_{final.name}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(ckpt_dir)
    for old in epoch_folders(ckpt_dir)[:-CHECKPOINTS_KEPT]:
        # Renamed out of the epoch_* names first: a kill inside rmtree would leave a half-deleted epoch folder.
        doomed = ckpt_dir / tmp_name(f"pruned_{old.name}")
        try:
            os.rename(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    return final


class NonFiniteLoss(keras.callbacks.Callback):
    """Stops training when the loss becomes NaN or infinite (the run then fails clearly)."""

    def __init__(self):
        super().__init__()
        # (epoch, batch or 0 for the epoch's end, the value, "loss" or "validation loss")
        self.failed_at: tuple[int, int, float, str] | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.failed_at = (self.epoch + 1, batch + 1, float(loss), "loss")
            self.model.stop_training = True


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback with the epoch's figures only (``epoch_*``, at step epoch - 1, Keras' own).

    Keras also writes ``evaluation_*_vs_iterations`` when validation ends, before the callbacks after it adjust the
    epoch's figures: with weight averaging its accuracy was the current weights' and not the average's, and its
    loss missed the padding correction of several replicas, two curves disagreeing with ``epoch_*``. The average's
    epoch count is bookkeeping for history.csv, not a curve."""

    def on_test_end(self, logs=None):
        super().on_test_end({})  # switches the writer back, and writes nothing

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, {k: v for k, v in (logs or {}).items() if k != "averaged_epochs"})


class MomentumLog(keras.callbacks.Callback):
    """Adds the optimizer's momentum to each epoch's logs (``momentum``), as Keras adds the learning rate, so that
    TensorBoard (``epoch_momentum``) and history.csv show a cycled momentum; callbacks after it see the value."""

    def on_epoch_end(self, epoch, logs=None):
        from fer_keras.schedules import current_momentum

        momentum = current_momentum(self.model.optimizer)
        if logs is not None and momentum is not None:
            logs["momentum"] = momentum


class PaddedValidationLoss(keras.callbacks.Callback):
    """Rescales the validation loss of a padded validation set (:func:`fer_keras.pipeline.eval_dataset`'s
    ``pad_to_batch``) to the mean over its real images. Keras weights each batch's loss by its image count,
    padding included, while the padding's weight-0 losses add nothing: the logged mean is ``real / padded``
    times the true one. Placed after the weight average's callback, which evaluates the same padded set."""

    def __init__(self, num_real: int, num_padded: int):
        super().__init__()
        self.scale = num_padded / num_real

    def on_epoch_end(self, epoch, logs=None):
        for key in ("val_loss", "val_raw_loss"):
            if logs is not None and key in logs:
                logs[key] = float(logs[key]) * self.scale


def save_best(model: keras.Model, out_dir: Path) -> None:
    """``best.keras``, written under a hidden name and renamed into place."""
    remove_dead_writers_tmp(out_dir, ".keras")
    tmp = out_dir / tmp_name("best", ".keras")
    try:
        model.save(str(tmp))
        fsync_path(tmp)
        os.replace(tmp, out_dir / "best.keras")
    finally:
        tmp.unlink(missing_ok=True)


def set_aside_lost_best(out_dir: Path, state: dict) -> Path | None:
    """Renames ``best.keras`` to ``best_epoch_NNNN_before_resume.keras`` when history.csv says it holds an epoch
    after the checkpoint resumed from (``state``: a newer one was damaged) that beat that checkpoint's best. The
    resumed run's history drops that epoch, so left in place best.keras would be no epoch of the history, and the
    first epoch beating the checkpoint's best would replace it however much worse. Returns the new path, or None
    when best.keras is the checkpoint's best epoch's (or unknown: no readable history.csv)."""
    best_file = out_dir / "best.keras"
    if not best_file.is_file():
        return None
    try:
        lost = [r for r in read_history_csv(out_dir / "history.csv") if r["epoch"] > state["epoch"]]
    except (FerError, OSError):  # rewritten from the checkpoint in a moment
        return None
    top = best_row(lost) if lost else {}
    if top.get("val_accuracy", -math.inf) <= state["best_val_accuracy"]:  # RunRecorder's test: a tie was not written
        return None
    name = f"best_epoch_{top['epoch']:04d}_before_resume"
    aside, n = out_dir / f"{name}.keras", 1
    while aside.exists():  # an earlier resume's: never replaced
        n += 1
        aside = out_dir / f"{name}_{n}.keras"
    os.rename(best_file, aside)
    fsync_path(out_dir)
    logging.warning(
        "%s held epoch %d (validation accuracy %.2f%%), whose checkpoint is damaged: kept as %s. Resuming after epoch "
        "%d, whose best is epoch %d (%.2f%%): %s", best_file, top["epoch"], 100 * top["val_accuracy"], aside.name,
        state["epoch"], state["best_epoch"], 100 * state["best_val_accuracy"],
        "best.keras is written again from that checkpoint" if state["best_epoch"] == state["epoch"]
        else "that epoch's model is gone, so best.keras is written again by the first epoch better than it")
    return aside


class RunRecorder(keras.callbacks.Callback):
    """Per epoch: checkpoint, best model, history.csv/png - each atomic, in that order.

    The checkpoint's state holds the full history and the best epoch, so after a crash between two of
    these writes the rerun rebuilds the rest from the checkpoint it resumes from (``train.run`` rewrites
    best.keras when that checkpoint's epoch is the best one).
    """

    def __init__(self, out_dir: Path, ckpt_dir: Path, chief: bool, guard: NonFiniteLoss,
                 history: list[dict], best: tuple[int, float], config_json: dict, replicas: int = 1,
                 averager: WeightAverage | None = None):
        super().__init__()
        self.averager = averager
        self.out_dir = out_dir
        self.ckpt_dir = ckpt_dir
        self.chief = chief
        self.guard = guard
        self.history = history
        self.best_epoch, self.best_val = best
        self.config_json = config_json
        self.replicas = replicas
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.failed_at is not None:
            return
        logs = logs or {}
        lr = self.model.optimizer.learning_rate
        row = {
            "epoch": epoch + 1,
            "loss": float(logs.get("loss", float("nan"))),
            "accuracy": float(logs.get("accuracy", float("nan"))),
            "val_loss": float(logs.get("val_loss", float("nan"))),
            "val_accuracy": float(logs.get("val_accuracy", float("nan"))),
            "learning_rate": float(np.asarray(keras.ops.convert_to_numpy(lr))),
            "seconds": round(time.monotonic() - self.started, 2),
        }
        if "momentum" in logs:  # MomentumLog's value; AdamW has none
            row["momentum"] = float(logs["momentum"])
        if "averaged_epochs" in logs:  # WeightAverage's: val_* are then the average's, val_raw_* the weights'
            row.update(val_raw_loss=float(logs["val_raw_loss"]), val_raw_accuracy=float(logs["val_raw_accuracy"]),
                       averaged_epochs=int(logs["averaged_epochs"]))
        bad = [k for k in ("loss", "val_loss") if not math.isfinite(row[k])]
        if bad:
            self.guard.failed_at = (epoch + 1, 0, row[bad[0]], "loss" if bad[0] == "loss" else "validation loss")
            self.model.stop_training = True
            return
        self.history[:] = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        improved = row["val_accuracy"] > self.best_val
        if improved:
            self.best_epoch, self.best_val = row["epoch"], row["val_accuracy"]
        state = {
            "epoch": row["epoch"],
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val,
            "history": self.history,
            "config": self.config_json,
            "replicas": self.replicas,
            "fer_keras_version": __version__,
        }
        averager = self.averager if self.averager is not None and self.averager.active else None
        write_checkpoint(self.model, self.ckpt_dir, state, extra=averager.save if averager else None)
        if self.chief and improved:
            with averager.applied() if averager else contextlib.nullcontext():
                save_best(self.model, self.out_dir)
        if self.chief:
            write_history_csv(self.out_dir / "history.csv", self.history)
            plot_history(self.history, self.out_dir / "history.png")
