"""Stochastic weight averaging (``train --average_from_epoch``): the model a run keeps is the mean of its weights
at the ends of the epochs since a given one.

SGD at a constant or cycled learning rate moves around a wide region of low training loss without settling in
it; the mean of the points it visits lies nearer that region's centre and generalises better than any one of
them (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", 2018). It costs one
extra pass over the selection split per averaged epoch after the first and a copy of the weights, no extra
training step.

The BatchNorm moving statistics are averaged with the weights, as exponential-moving-average implementations of
the same idea do; ``evaluate --precise_bn`` measures re-estimating them instead (the paper's choice). Training
continues from the current weights, never from the average: the average is swapped in only to validate it and
to save ``best.keras``. It is kept in every checkpoint (``average.npz``) so that a resumed run averages on.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Iterator

import keras
import numpy as np

from fer_keras.errors import ConfigError
from fer_keras.history import NPZ_ERRORS, atomic_write_text, open_npz

AVERAGE_FILE = "average.npz"


class WeightAverage(keras.callbacks.Callback):
    """From epoch ``start_epoch`` (1-based) on, adds each epoch's final weights to a running mean and replaces the
    epoch's ``val_loss``/``val_accuracy`` by the mean's (the current weights' move to ``val_raw_*``), so that
    TensorBoard, history.csv and the choice of ``best.keras`` all see the model that would be kept.

    Goes after the callback that stops on a non-finite loss (``guard``) and before those that record the logs.
    """

    def __init__(self, start_epoch: int, val_data, guard=None,
                 restored: tuple[list[np.ndarray], int] | None = None):
        super().__init__()
        if start_epoch < 1:
            raise ConfigError(f"average_from_epoch must be >= 1 to average, got {start_epoch}")
        self.start_epoch = start_epoch
        self.val_data = val_data
        self.guard = guard
        self.average, self.count = restored if restored else (None, 0)

    @property
    def active(self) -> bool:
        return self.average is not None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 < self.start_epoch or (self.guard is not None and self.guard.failed_at is not None):
            return
        current = self.model.get_weights()
        if not all(np.isfinite(w).all() for w in current):
            return  # the guard or the recorder stops the run on this epoch's loss; nothing non-finite is kept
        if self.average is None:
            self.average, self.count = [w.astype(np.float32, copy=True) for w in current], 1
        else:
            if len(current) != len(self.average) or any(a.shape != w.shape for a, w in zip(self.average, current)):
                raise ConfigError("the stored weight average does not fit this model: use a new --model_dir")
            self.count += 1
            for a, w in zip(self.average, current):
                a += (w.astype(np.float32) - a) / self.count
        if logs is None:
            return
        if self.count == 1 and "val_loss" in logs and "val_accuracy" in logs:
            # The mean of one epoch is that epoch's weights, which fit has just validated on the same data.
            result = {"loss": logs["val_loss"], "accuracy": logs["val_accuracy"]}
        else:
            with self.applied():
                result = self.model.evaluate(self.val_data, verbose=0, return_dict=True)
        logs["val_raw_loss"] = logs.get("val_loss", math.nan)
        logs["val_raw_accuracy"] = logs.get("val_accuracy", math.nan)
        logs["val_loss"] = float(result["loss"])
        logs["val_accuracy"] = float(result["accuracy"])
        logs["averaged_epochs"] = self.count

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it, whatever happens."""
        if self.average is None:
            yield
            return
        own = self.model.get_weights()
        self.model.set_weights(self.average)
        try:
            yield
        finally:
            self.model.set_weights(own)

    def save(self, folder: Path) -> None:
        """``average.npz`` in ``folder`` (a checkpoint being written), when there is an average."""
        if self.average is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, count=np.array(self.count), **{f"w{i:04d}": a for i, a in enumerate(self.average)})
        atomic_write_text(folder / AVERAGE_FILE, buffer.getvalue())


def load(folder: Path, model: keras.Model) -> tuple[list[np.ndarray], int]:
    """The average a checkpoint folder keeps, checked against ``model``'s weights; a one-line error naming the
    file when it is missing, damaged or of another model (a resumed run would otherwise start its mean afresh)."""
    path = folder / AVERAGE_FILE
    try:
        with open_npz(path) as f:
            count = int(f["count"])
            names = sorted(k for k in f.files if k.startswith("w"))
            average = [np.asarray(f[k], np.float32) for k in names]
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing, so the run's weight average is lost; use a new --model_dir") from None
    except NPZ_ERRORS as e:
        raise ConfigError(f"{path}: unreadable ({e}); use a new --model_dir") from None
    shapes = [tuple(w.shape) for w in model.weights]
    if count < 1 or [a.shape for a in average] != shapes:
        raise ConfigError(f"{path}: holds {len(average)} arrays averaged over {count} epoch(s), which do not fit "
                          f"this model's {len(shapes)} weights; use a new --model_dir")
    return average, count
