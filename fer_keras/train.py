"""Train ResNet-18 on FER2013: ``python -m fer_keras.train [--flagfile=flags/RECIPE.cfg]``.

:func:`run` takes a :class:`TrainConfig` (tests call it directly); the entrypoint only turns flags
into that config. Outputs in ``model_dir``:

* ``logs/`` TensorBoard (train/validation loss and accuracy per epoch, learning rate);
* ``history.csv`` and ``history.png`` (accuracy left axis, loss right axis);
* ``best.keras``: the model of the epoch with the best validation accuracy;
* ``checkpoints/epoch_NNNN/``: weights with optimizer state and the run state, written atomically;
  rerunning the same command resumes after the last completed epoch, even after SIGKILL;
* ``flags.txt`` and ``config.json``: how the run was made;
* ``init.json`` (with ``--init_from``): the model whose weights the run started from;
* ``teachers.json`` and ``teacher_targets.npz`` (with ``--teachers``): the models it was distilled from and their
  probabilities on the training images.

At the end the best model is exported for TF Serving (``saved_models/<run folder name>/<next version>``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from absl import flags, logging

from fer_keras import IMAGE_SIZE, STEMS, STRATEGIES, __version__, cli, distill
from fer_keras.augment import ERASING_FILLS, FILL_MODES, AugmentConfig, check_input_crop
from fer_keras.errors import ConfigError, FerError, ModelError, WorkerLostError
from fer_keras.history import (
    atomic_write_text,
    check_json_replaceable,
    check_replaceable,
    read_data_record,
    run_record,
    write_history_csv,
)
from fer_keras.tta import AUTO, DEFAULT_CROP_SIZE, DEFAULT_TOLERANCE, TTA_MODES, crop_sides_ok

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from fer_keras.data import FerData, Split

ONEDNN_OFF = ("off (TF_ENABLE_ONEDNN_OPTS=0, or TensorFlow was imported before fer_keras): several times "
              "slower on CPUs")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "constant")
EXPORT_TTAS = TTA_MODES + (AUTO,)
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
EXPORT_MARKER = "export.json"  # in a run folder: what the run exported, so that a rerun does not export again
# Fields that may change between an interrupted run and its resumption.
RESUMABLE_FIELDS = {
    "strategy", "cpu_devices", "num_gpus", "tpu_address", "collective_timeout", "verbose", "export", "export_dir",
    "export_name", "export_version", "export_tta", "export_tta_tolerance", "export_crop_size", "use_cache", "data",
    "model_dir",  # the folder holding config.json; another spelling of it (runs/a/, ./runs/a) is the same run
    "deterministic", "steps_per_execution",  # how the same steps execute, not which steps
}


def _plain_name(name: str) -> bool:
    return bool(name) and name == name.strip() and "/" not in name and not name.startswith(".")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; written to ``model_dir/config.json``."""

    data: str = ""
    model_dir: str = "runs/my_resnet18"
    val_fraction: float = 0.1
    skip_bad_rows: bool = False
    use_cache: bool = True
    max_train_examples: int = 0
    max_val_examples: int = 0
    # Model.
    # Defaults train the bundled sample in minutes; flags/fer2013.cfg trains the shipped model's chain of runs.
    stem: str = "imagenet"
    input_channels: int = 1
    dropout: float = 0.2
    sync_batchnorm: bool = False
    # The network sees the central input_crop pixels square (0: all 48), trained on random windows of that size.
    input_crop: int = 0
    # Start from a trained model's weights (a .keras file, a run directory's best.keras, an export, or a recipe's
    # flagfile for the model it trains: fer_keras.recipe) instead of random ones: fine-tuning, or a further
    # learning-rate cycle after a finished run.
    init_from: str = ""
    # Knowledge distillation: targets (1 - distill_weight) * one-hot + distill_weight * the teachers' mean
    # probabilities (softened by distill_temperature), computed once on the training images (fer_keras.distill);
    # the loss then applies label_smoothing s to them as to one-hot labels: (1 - s) * target + s / 7.
    teachers: tuple[str, ...] = ()
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    # The views averaged for a teacher without TTA of its own (an export keeps its built-in one): flip gained
    # 0.8-1.0 points on PublicTest for versions 5 and 6 at one extra pass.
    teacher_tta: str = "flip"
    # Optimisation.
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    # 0.1 (the recipes' value) makes the 7-step epochs of the 999-image sample diverge; 0.02 does not.
    learning_rate: float = 0.02
    momentum: float = 0.9
    # onecycle + sgd: momentum cycles from --momentum down to base_momentum and back, as in PyTorch's OneCycleLR.
    cycle_momentum: bool = False
    base_momentum: float = 0.85
    weight_decay: float = 5e-4
    # Decay BatchNorm's scales/offsets and the biases as well, as PyTorch's SGD weight_decay does every parameter.
    decay_norm_and_bias: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 2.0
    step_epochs: tuple[int, ...] = ()
    step_gamma: float = 0.1
    label_smoothing: float = 0.1
    # Stochastic weight averaging from this epoch (1-based) on: the model validated, kept and exported is the mean
    # of the weights at the ends of the epochs since (fer_keras.averaging); 0: off.
    average_from_epoch: int = 0
    precision: str = "float32"
    steps_per_execution: int = 1
    seed: int = 0
    deterministic: bool = False
    # Augmentation.
    flip: bool = True
    shift: float = 0.1
    rotation: float = 10.0
    zoom: float = 0.1
    erasing: float = 0.25
    erasing_max_area: float = 0.25
    erasing_fill: str = "noise"
    mixup: float = 0.0
    fill_mode: str = "reflect"
    # Distribution.
    strategy: str = "default"
    cpu_devices: int = 0
    num_gpus: int = -1
    tpu_address: str = ""
    collective_timeout: float = 600.0
    # Export.
    export: bool = True
    export_dir: str = "saved_models"
    # Empty: the run directory's name, so a user's runs never add versions to the shipped fer_resnet18.
    export_name: str = ""
    export_version: int = 0
    # auto: the TTA (none, flip, tencrop) is measured on the selection split and the cheapest within
    # export_tta_tolerance points of the best is built in.
    export_tta: str = "auto"
    export_tta_tolerance: float = DEFAULT_TOLERANCE
    # Ten-crop's crop side; with export_tta auto, several are each measured and the most accurate built in.
    export_crop_size: tuple[int, ...] = (DEFAULT_CROP_SIZE,)
    verbose: int = 1

    @property
    def resolved_export_name(self) -> str:
        return self.export_name or Path(self.model_dir).resolve().name

    def augment_config(self) -> AugmentConfig:
        """The training pipeline's :class:`fer_keras.augment.AugmentConfig` of this run."""
        return AugmentConfig(flip=self.flip, shift=self.shift, rotation=self.rotation, zoom=self.zoom,
                             erasing=self.erasing, erasing_max_area=self.erasing_max_area,
                             erasing_fill=self.erasing_fill, mixup=self.mixup, fill_mode=self.fill_mode,
                             crop=self.input_crop)

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.steps_per_execution >= 1, f"steps_per_execution must be >= 1, got {self.steps_per_execution}"),
            (self.stem in STEMS, f"unknown stem {self.stem!r}; choose one of {', '.join(STEMS)}"),
            (self.input_channels in (1, 3), f"input_channels must be 1 or 3, got {self.input_channels}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose {', '.join(PRECISIONS)}"),
            (self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose {', '.join(STRATEGIES)}"),
            (self.export_tta in EXPORT_TTAS,
             f"unknown export_tta {self.export_tta!r}; choose {', '.join(EXPORT_TTAS)}"),
            (self.export_tta_tolerance >= 0, f"export_tta_tolerance must be >= 0, got {self.export_tta_tolerance}"),
            (bool(self.export_crop_size) and all(0 < c <= IMAGE_SIZE for c in self.export_crop_size),
             f"export_crop_size must be one or more sides in 1-{IMAGE_SIZE}, got {list(self.export_crop_size)}"),
            (self.export_tta == AUTO or len(set(self.export_crop_size)) <= 1,
             f"export_crop_size {list(self.export_crop_size)}: several sides are measured only with export_tta=auto"),
            (self.cpu_devices >= 0, f"cpu_devices must be >= 0, got {self.cpu_devices}"),
            (self.cpu_devices <= 1 or self.strategy == "mirrored",
             f"cpu_devices {self.cpu_devices} splits the CPU for strategy=mirrored only, got strategy={self.strategy}"),
            (self.collective_timeout >= 0, f"collective_timeout must be >= 0, got {self.collective_timeout}"),
            (self.verbose in (0, 1, 2), f"verbose must be 0, 1 or 2, got {self.verbose}"),
            (self.max_train_examples >= 0 and self.max_val_examples >= 0, "max_*_examples must be >= 0"),
            (self.export_version >= 0, f"export_version must be >= 0, got {self.export_version}"),
            (cli.check_seed(self.seed) is None, cli.check_seed(self.seed)),
            (0 <= self.average_from_epoch <= self.epochs,
             f"average_from_epoch must be between 0 (off) and epochs ({self.epochs}), got {self.average_from_epoch}"),
            (0 < self.step_gamma <= 1, f"step_gamma must be in (0, 1], got {self.step_gamma}"),
            (self.num_gpus >= -1, f"num_gpus must be >= -1 (-1: all), got {self.num_gpus}"),
            (0 <= self.distill_weight <= 1, f"distill_weight must be in [0, 1], got {self.distill_weight}"),
            (self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}"),
            (not self.teachers or self.distill_weight > 0,
             "teachers with distill_weight 0 would be run over the training images and then ignored"),
            (all(self.teachers), "teachers: an empty path"),
            (self.teacher_tta in TTA_MODES, f"unknown teacher_tta {self.teacher_tta!r}; choose {', '.join(TTA_MODES)}"),
            (not self.export or _plain_name(self.resolved_export_name),
             f"export name {self.resolved_export_name!r} must be a plain folder name (--export_name)"),
            (all(0 < e < self.epochs for e in self.step_epochs),
             f"step_epochs must be between 1 and epochs - 1 ({self.epochs - 1}), got {list(self.step_epochs)}"),
        ]
        for name in FLOAT_FIELDS:
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.model_dir.strip():
            raise ConfigError("model_dir must name a folder (empty would train into the current directory)")
        if self.export and not self.export_dir.strip():
            raise ConfigError("export_dir must name a folder (empty would export into the current directory; "
                              "--noexport skips the export)")
        if self.step_epochs and self.schedule != "step":
            raise ConfigError(f"step_epochs {list(self.step_epochs)} apply to schedule=step only, got "
                              f"schedule={self.schedule}")
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.schedule == "step" and not self.step_epochs:
            raise ConfigError("schedule=step needs --step_epochs (e.g. 30,45)")
        if self.cycle_momentum and (self.schedule != "onecycle" or self.optimizer != "sgd"):
            raise ConfigError(f"cycle_momentum needs schedule=onecycle and optimizer=sgd, got schedule={self.schedule} "
                              f"and optimizer={self.optimizer}")
        if self.cycle_momentum and not 0 < self.base_momentum <= self.momentum:
            raise ConfigError(f"cycle_momentum needs 0 < base_momentum <= momentum, got {self.base_momentum:g} and "
                              f"{self.momentum:g}")
        if self.schedule == "onecycle" and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"schedule=onecycle needs warmup_epochs < epochs, got {self.warmup_epochs:g} of "
                              f"{self.epochs}")
        try:
            check_input_crop(self.input_crop)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.augment_config()  # its own range checks

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["step_epochs"] = list(self.step_epochs)
        d["teachers"] = list(self.teachers)
        d["export_crop_size"] = list(self.export_crop_size)
        return d

    @staticmethod
    def recorded(config_json: dict) -> dict:
        """A run's config.json with the settings it predates filled in with their defaults."""
        return {**TrainConfig().to_json(), **config_json}


@dataclasses.dataclass
class TrainResult:
    model_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_accuracy: float
    export_path: Path | None
    resumed_from: int
    num_replicas: int


# --------------------------------------------------------------------------------------------
# The run


def _preflight(model_dir: Path, export_base: Path | None) -> None:
    """Fails before training when outputs cannot be written, instead of after an epoch."""
    for folder in [model_dir] + ([export_base] if export_base else []):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"{folder}: not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(model_dir).free
    need = 400 << 20  # two checkpoints with optimizer state + best.keras + logs
    if free < need:
        raise ConfigError(f"{model_dir}: only {free >> 20} MiB free, a run needs about {need >> 20} MiB")


def _run_started(model_dir: Path, latest_checkpoint: tuple[Path, dict] | None) -> bool:
    """A run's settings and data are fixed once an epoch has finished (a checkpoint, best.keras or history.csv
    exists). A first attempt that stopped before that - a NaN loss in epoch 1, a wrong --data seen in the
    start-up line, an out-of-memory error - may be rerun in the same folder with other flags."""
    return (latest_checkpoint is not None
            or (model_dir / "best.keras").is_file() or (model_dir / "history.csv").is_file())


def _refuse_foreign_files(model_dir: Path) -> None:
    """A new run writes config.json, data.json and flags.txt: in a folder that already holds files of those names
    that no fer_keras run wrote (a project's own config.json), it stops rather than overwrite them. A started run's
    files are compared by the resume checks instead."""
    what, flag = "a fer_keras run's {}", "--model_dir"
    check_json_replaceable(model_dir / "config.json", ("stem", "epochs", "batch_size"), what.format("config"), flag)
    check_json_replaceable(model_dir / "data.json", ("source", "train", "val"), what.format("data record"), flag)
    check_replaceable(model_dir / "flags.txt", (b"--",), what.format("flags"), flag)


def _same_setting(key: str, old, new) -> bool:
    if key == "init_from" and old and new:  # one start model, however its path is spelled
        return os.path.abspath(old) == os.path.abspath(new)
    if key == "teachers":
        return distill.same_paths(old, new)
    return old == new


def check_resumable(model_dir: Path, config: TrainConfig, latest: tuple[Path, dict] | None,
                    advice: str = "use a new --model_dir or the original flags") -> None:
    """Refuses settings that differ from the run's: those of its config.json or, when that is missing or damaged,
    the copy in its latest checkpoint (before this run rewrites config.json with the new ones)."""
    path = model_dir / "config.json"
    old = None
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except ValueError:
        logging.warning("%s: damaged; %s", path, "comparing the settings with the latest checkpoint's copy" if latest
                        else "no checkpoint holds a copy, so the settings cannot be compared")
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(old, dict):
        old = latest[1].get("config") if latest else None
    if not isinstance(old, dict):
        return  # neither is there: nothing recorded to compare with
    # A setting added since the run was made is compared with its default: the behaviour the run had.
    old = TrainConfig.recorded(old)
    new = config.to_json()
    ignored = set(RESUMABLE_FIELDS)
    if not old.get("cycle_momentum") and not new.get("cycle_momentum"):
        ignored.add("base_momentum")  # no effect without the cycle
    changed = sorted(k for k in new if k not in ignored and not _same_setting(k, old.get(k), new[k]))
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(
            f"{model_dir} holds a run made with other settings ({diffs}); {advice}"
        )


def run_splits(dataset: FerData, config: TrainConfig) -> tuple[Split, Split, str]:
    """(training split, selection split, the selection split's name) of a run: PublicTest when the data has
    it, else a stratified hold-out of Training; both cut to the run's example limits."""
    from fer_keras import data as data_lib

    train_split, val_split = data_lib.train_val(dataset, config.val_fraction, config.seed)
    train_split = _subset(train_split, config.max_train_examples, config.seed)
    val_split = _subset(val_split, config.max_val_examples, config.seed)
    val_name = ("PublicTest" if data_lib.has_labelled_val(dataset)
                else data_lib.hold_out_name(config.val_fraction))
    return train_split, val_split, val_name


def selection_split_of(dataset: FerData, run_config: dict) -> tuple[Split, str]:
    """The split a recorded run selected its epoch on, rebuilt from ``dataset``, and its name."""
    _, val, name = run_splits_of(dataset, run_config)
    return val, name


def run_splits_of(dataset: FerData, run_config: dict) -> tuple[Split, Split, str]:
    """:func:`run_splits` of a recorded run (its ``config.json``), rebuilt from ``dataset``."""
    recorded = TrainConfig.recorded(run_config)
    config = TrainConfig(**{k: recorded[k] for k in ("val_fraction", "seed", "max_train_examples",
                                                       "max_val_examples")})
    return run_splits(dataset, config)


def selection_subset_of(val_split: Split, run_config: dict) -> Split:
    """The ``--max_val_examples`` subset of a whole selection split that a recorded run chose its epoch on."""
    recorded = TrainConfig.recorded(run_config)
    return _subset(val_split, recorded["max_val_examples"], recorded["seed"])


def _check_same_data(model_dir: Path, source: str, train_split, val_split, val_name: str,
                     enforce: bool = True) -> tuple[dict, bool]:
    """Refuses to resume (or to call finished) a run on other data than it was trained on; the path may
    change (``data`` is resumable), the images and labels may not. Returns the record for ``data.json`` and
    whether the folder holds a usable one; ``enforce=False`` (a run without a finished epoch) only builds the
    record."""
    record = {
        "source": source,
        "train": {"images": len(train_split), "sha256": train_split.fingerprint()},
        "val": {"images": len(val_split), "name": val_name, "sha256": val_split.fingerprint()},
    }
    path = model_dir / "data.json"
    try:
        old = read_data_record(model_dir)  # missing or damaged: written from this data (train.run)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if old is None and path.is_file():
        logging.warning("%s: damaged; the data cannot be compared and the record is written afresh from %s",
                        path, source)

    def count(value) -> str:
        return f"{value:,}" if isinstance(value, int) else "?"

    if old is not None and enforce:
        differs = [k for k in ("train", "val") if old[k].get("sha256") != record[k]["sha256"]]
        if differs:
            raise ConfigError(
                f"{model_dir} holds a run trained on other data ({old.get('source')}: "
                f"{count(old['train'].get('images'))} training and {count(old['val'].get('images'))} validation "
                "images); "
                f"{source} gives {len(train_split):,} and {len(val_split):,}, and different "
                f"{' and '.join(differs)} images or labels; use a new --model_dir or the original --data"
            )
    return record, old is not None


def _subset(split, limit: int, seed: int):
    if not limit or limit >= len(split):
        return split
    from fer_keras.data import stratified_split

    _, kept = stratified_split(split, limit / len(split), seed)
    if len(kept) > limit:  # per-class rounding (at least one image per class) can overshoot a small limit
        import numpy as np

        kept = kept.take(np.sort(np.random.default_rng(seed).permutation(len(kept))[:limit]))
    return kept


def build_optimizer(config: TrainConfig, steps_per_epoch: int, model: keras.Model) -> keras.Optimizer:
    """The optimizer and learning-rate schedule ``config`` names, over ``config.epochs * steps_per_epoch`` steps;
    for ``mixed_float16``, wrapped for loss scaling that holds across replicas (:mod:`fer_keras.precision`).

    Validates ``config`` first, so a caller that built it by hand gets the same error as the flags would give
    instead of, say, an unknown optimizer silently becoming AdamW.
    """
    import keras

    config.validate()
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    lr = config.learning_rate
    if config.schedule == "cosine":
        if warmup >= total:
            # Allowed, so that the defaults (2 warm-up epochs) work for a 1- or 2-epoch try, but said.
            logging.warning("--warmup_epochs=%g covers all %d epoch(s): the learning rate rises for the whole run and "
                            "does not decay; lower --warmup_epochs (e.g. to 0) for a short run", config.warmup_epochs,
                            config.epochs)
        warmup = min(warmup, total - 1)
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr / 10 if warmup else lr,
            decay_steps=max(total - warmup, 1),
            alpha=0.0,
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    elif config.schedule == "onecycle":
        from fer_keras.schedules import OneCycle

        warmup = min(warmup, total - 1)
        schedule = OneCycle(lr, total_steps=total, warmup_steps=warmup)
    elif config.schedule == "step":
        # PiecewiseConstantDecay switches after step == boundary; the first step of epoch e + 1 is e * steps.
        boundaries = [e * steps_per_epoch - 1 for e in sorted(config.step_epochs)]
        values = [lr * config.step_gamma**i for i in range(len(boundaries) + 1)]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    else:  # "constant"; validate() rejected anything else
        schedule = lr
    wd = config.weight_decay or None
    if config.optimizer == "sgd" and config.cycle_momentum:
        from fer_keras.schedules import OneCycleMomentum, ScheduledMomentumSGD

        momentum = OneCycleMomentum(total, warmup, base_momentum=config.base_momentum, max_momentum=config.momentum)
        opt = ScheduledMomentumSGD(schedule, momentum, nesterov=True, weight_decay=wd)
    elif config.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=config.momentum, nesterov=True, weight_decay=wd)
    else:  # "adamw"
        opt = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    if not config.decay_norm_and_bias:
        # Decay conv and dense kernels only: BatchNorm scales/offsets and biases are 1-D.
        opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    from fer_keras.precision import for_precision

    return for_precision(opt, config.precision)


def load_initial_model(init_from: str) -> tuple[keras.Model, dict]:
    """The model ``--init_from`` names and the record ``init.json`` keeps of it: path, SHA-256 (of the
    ``.keras`` file, or of an export's variables) and what is known of the run that trained it (epochs, best
    epoch, wall time, configuration and flags), so the record outlives that run's directory.

    Accepted: a ``.keras`` file, a run directory (its ``best.keras``), or a TF Serving export
    (``saved_models/NAME/VERSION``, or ``NAME`` for its highest version) such as the shipped model.
    """
    from fer_keras import inference
    from fer_keras.model import load_keras_model
    from fer_keras.model_card import export_start_run

    path = Path(init_from)
    run_dir = path if path.is_dir() else None
    if run_dir is not None and not (run_dir / "best.keras").is_file():
        try:
            kind, export_dir = inference.resolve(run_dir)
        except ModelError:
            kind = None
        if kind == "saved_model":
            try:
                model = inference.load_keras(export_dir)
            except ModelError as e:
                raise ConfigError(f"--init_from={init_from}: {e}") from None
            metadata = inference.export_metadata(export_dir)
            record = {"path": str(export_dir.resolve()),
                      "sha256": inference.model_sha256(kind, export_dir),
                      "export": {k: metadata.get(k) for k in ("tta", "val_split")}}
            start_run = export_start_run(export_dir, metadata)
            if start_run is not None:
                record["run"] = start_run
            return model, record
    if run_dir is not None:
        path = run_dir / "best.keras"
    if not path.is_file():
        raise ConfigError(f"--init_from={init_from}: no such .keras file, run directory with a best.keras, or "
                          "SavedModel export")
    record: dict = {"path": str(path.resolve()), "sha256": inference.model_sha256("keras", path)}
    # Only a run's best.keras is described by the run's history; another .keras file beside it is not.
    run_dir = run_dir or (path.parent if path.name == "best.keras" else None)
    start_run = run_record(run_dir) if run_dir is not None else None
    if start_run is not None:
        record["run"] = start_run
    return load_keras_model(str(path)), record


def copy_weights(source: keras.Model, target: keras.Model, source_name: str, dry_run: bool = False) -> None:
    """Copies every layer's weights by name; a ConfigError naming the layers only one model has, or the first
    whose weight shapes differ, so a model of another stem or input width is refused instead of half-loaded.
    ``dry_run`` only checks."""
    def weighted(model):
        return {layer.name: layer for layer in model.layers if layer.weights}

    theirs, ours = weighted(source), weighted(target)
    missing = sorted(set(ours) ^ set(theirs))
    if missing:
        raise ConfigError(f"--init_from={source_name}: layers differ from this run's model ({', '.join(missing)}); "
                          "use the --stem and --input_channels it was trained with")
    for name, layer in ours.items():
        values = theirs[name].get_weights()
        want = [tuple(w.shape) for w in layer.weights]
        have = [tuple(v.shape) for v in values]
        if want != have:
            raise ConfigError(f"--init_from={source_name}: layer {name} has weights of shapes {have}, this run's "
                              f"model needs {want}; use the --stem and --input_channels it was trained with")
        if not dry_run:
            layer.set_weights(values)


def precision_advice(precision: str, cpu: dict) -> str | None:
    """A warning when training on the CPU in ``precision`` will be much slower than float32, else None.

    Without bf16 arithmetic (AMX or AVX512_BF16) oneDNN declines bf16 and TensorFlow falls back to Eigen kernels
    that emulate it (its log says so), so the ``*_bf16`` recipes, written for the machines that have it, crawl on
    others: 3.2 against 54.6 img/s (17x) on an AVX2 AMD EPYC (README, Speed). ``cpu`` is
    ``benchmark.cpu_info()``; where it found none of the SIMD flags it looks for (no /proc/cpuinfo, as on macOS)
    the CPU is unknown and nothing is said.
    """
    if precision == "mixed_bfloat16" and cpu["relevant_flags"] and cpu["bf16_unit"].startswith("none"):
        return (f"--precision=mixed_bfloat16 on a CPU without bf16 arithmetic ({cpu['model']}, {cpu['simd']}): "
                "TensorFlow emulates it, 13-17x slower than float32 on AVX2 EPYCs (README, Speed); "
                "use --precision=float32 on this machine")
    if precision == "mixed_float16":  # the GPU setting; even AVX512-FP16 did not help TensorFlow on a Xeon here
        return ("--precision=mixed_float16 without a GPU: TensorFlow emulates float16 on CPUs (a step of 16 images "
                "took 15-30 s on an AVX512-FP16 Xeon, README, Training); use --precision=float32, or mixed_bfloat16 "
                "on a CPU with bf16 arithmetic")
    return None


def load_checkpoint_weights(model, folder: Path) -> None:
    """A checkpoint's weights and optimizer state; a file that cannot be read (one written before checkpoints
    recorded their hashes, damaged since) is named in one line, with the way back to the epoch before."""
    path = folder / "model.weights.h5"
    try:
        model.load_weights(str(path))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{path}: cannot be loaded ({first}); move {folder.name} out of {folder.parent} to "
                          "resume from the epoch before") from None


def run(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Trains (or resumes) per ``config`` under ``strategy`` (built from the config if None). The recipes that
    ``config.init_from`` or ``config.teachers`` name are trained first, unless this run has started
    (:mod:`fer_keras.recipe`)."""
    config.validate()
    import keras
    import tensorflow as tf

    from fer_keras import averaging, checkpoint, distribute, export, pipeline, recipe
    from fer_keras import data as data_lib
    from fer_keras.model import resnet18

    # The chief's newest checkpoint, read (and its files hashed) once: a started run needs no recipe stage.
    latest = checkpoint.latest_checkpoint(Path(config.model_dir) / "checkpoints")
    init_from, teacher_paths = config.init_from, config.teachers
    if recipe.references(config):  # before the strategy takes the devices that the stages' processes need
        if latest is None:
            recipe.train_stages(config, recipe.plan(config))
        init_from, teacher_paths = recipe.locate(config)
    if strategy is None:
        on_cpu = not tf.config.list_physical_devices("GPU")
        cpu = config.cpu_devices or (2 if config.strategy == "mirrored" and on_cpu else 1)
        distribute.configure_cpu_devices(cpu)
        strategy = distribute.create_strategy(
            config.strategy, None if config.num_gpus < 0 else config.num_gpus, config.tpu_address,
            collective_timeout=config.collective_timeout,
        )
    if not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")):
        from fer_keras.benchmark import cpu_info

        advice = precision_advice(config.precision, cpu_info())
        if advice:
            logging.warning(advice)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by the {replicas} replicas; "
            f"use a multiple of {replicas}"
        )
    chief = distribute.is_chief(strategy)
    model_dir = Path(config.model_dir)
    out_dir = model_dir if chief else model_dir / "workers" / distribute.worker_id(strategy)
    export_base = Path(config.export_dir) if (config.export and chief) else None
    ckpt_dir = out_dir / "checkpoints"
    # Every worker resumes from the chief's checkpoint where it sees the chief's folder, else from its own (the
    # same weights); all of them must restart at the same epoch, or the replicas would diverge or hang.
    if latest is None and not chief:
        latest = checkpoint.latest_checkpoint(ckpt_dir)
    epochs = distribute.replica_values(strategy, latest[1]["epoch"] if latest else 0)
    if len(set(epochs)) > 1:
        raise ConfigError(f"the workers would resume after different epochs ({', '.join(f'{e:g}' for e in epochs)}, "
                          f"by replica; this one: {latest[1]['epoch'] if latest else 0}): give every worker a "
                          "--model_dir on a file system they all see, holding the run's checkpoints (a worker one "
                          "epoch ahead after a kill: move its newest checkpoints/epoch_NNNN folder away)")
    started = _run_started(model_dir, latest)
    if started and latest is None and chief:
        raise ConfigError(f"{model_dir} holds finished epochs (history.csv or best.keras) but no usable checkpoint "
                          f"in {model_dir / 'checkpoints'}: a rerun would train from scratch over them; use a new "
                          "--model_dir")
    if started:
        check_resumable(model_dir, config, latest)
    elif chief:
        _refuse_foreign_files(model_dir)
    if config.average_from_epoch and latest and latest[1]["epoch"] >= config.average_from_epoch:
        # Found before anything is rewritten; load() checks the arrays against the model once it is built.
        average_file = latest[0] / averaging.AVERAGE_FILE
        if not average_file.is_file():
            raise ConfigError(f"{average_file}: missing, so the run's weight average is lost; use a new --model_dir")
    trained_on = latest[1].get("replicas") if latest else None
    if trained_on is not None and trained_on != replicas and not config.sync_batchnorm:
        # Allowed (a run may move to other hardware), but BatchNorm then normalises over other batches.
        logging.warning("resuming a run trained on %d replica(s) with %d: BatchNorm now normalises over %d images "
                        "per replica instead of %d (--sync_batchnorm would use the global batch of %d)", trained_on,
                        replicas, config.batch_size // replicas, config.batch_size // trained_on, config.batch_size)

    # Data first: a bad file must not leave new empty output folders behind.
    dataset = data_lib.load(config.data or None, skip_bad_rows=config.skip_bad_rows, use_cache=config.use_cache)
    train_split, val_split, val_name = run_splits(dataset, config)
    data_record, data_recorded = _check_same_data(model_dir, dataset.source, train_split, val_split, val_name,
                                                  enforce=started)
    # A resumed run continues from its checkpoint; the initial model matters only at the start.
    init_source = load_initial_model(init_from) if init_from and not latest else None
    if init_source is not None:  # a model of another architecture is refused before any output is written
        copy_weights(init_source[0], resnet18(config.stem, config.input_channels, dropout=config.dropout,
                                              input_crop=config.input_crop), init_from, dry_run=True)
    steps = pipeline.steps_per_epoch(len(train_split), config.batch_size)
    if steps == 0:
        raise ConfigError(
            f"{len(train_split)} training images is fewer than one batch of {config.batch_size}"
        )
    if steps % config.steps_per_execution:
        # Keras would run whole calls of steps_per_execution steps: epochs would read into the next epoch's
        # batches and a resumed run would no longer see the batches of an uninterrupted one.
        raise ConfigError(f"steps_per_execution {config.steps_per_execution} does not divide the {steps} steps "
                          f"of an epoch ({len(train_split):,} images / batch {config.batch_size}); use a divisor "
                          f"of {steps}")
    if export_base is not None and config.export_version and not (model_dir / EXPORT_MARKER).is_file():
        target = export_base / config.resolved_export_name / str(config.export_version)
        if target.exists():  # found now, not after hours of training
            raise ConfigError(f"{target}: export version {config.export_version} exists; it is never overwritten")
    # A new run's teacher paths are checked before any output folder exists; a started run may have its stored
    # probabilities and need no teacher at all.
    specs = teacher_paths if started else [distill.describe_teacher(t) for t in teacher_paths]
    _preflight(out_dir, export_base)
    teachers, targets = None, None
    if config.teachers:
        teachers, teachers_fresh = distill.prepare(
            out_dir, specs, train_split.images, train_split.labels, data_record["train"]["sha256"], started,
            val_name, config.teacher_tta, val_fraction=config.val_fraction, seed=config.seed,
            data=data_record, dataset=dataset, selection=val_split, use_cache=config.use_cache)
        targets = teachers.targets(train_split.labels, config.distill_weight, config.distill_temperature)

    initial_epoch = latest[1]["epoch"] if latest else 0
    history: list[dict] = list(latest[1]["history"]) if latest else []
    best = (latest[1]["best_epoch"], latest[1]["best_val_accuracy"]) if latest else (0, -1.0)
    config_json = config.to_json()
    if chief:
        atomic_write_text(model_dir / "config.json", json.dumps(config_json, indent=2) + "\n")
        if not started or not data_recorded:
            atomic_write_text(model_dir / "data.json", json.dumps(data_record, indent=2) + "\n")
        atomic_write_text(model_dir / "flags.txt", "".join(f"{arg}\n" for arg in flag_args(config_json)))
        if latest:
            _forget_lost_epochs(model_dir, latest[1])
        if history:
            write_history_csv(model_dir / "history.csv", history)
        if init_source is not None:
            atomic_write_text(model_dir / "init.json", json.dumps(init_source[1], indent=2) + "\n")
        elif not started:  # a first attempt's start model, not this run's
            (model_dir / "init.json").unlink(missing_ok=True)
    if teachers is not None and teachers_fresh:
        distill.save(out_dir, teachers)

    print(
        f"fer_keras {__version__}: {distribute.describe(strategy)}, global batch {config.batch_size} "
        f"({config.batch_size // replicas} per replica), {len(train_split):,} training images "
        f"({steps} steps/epoch), validation on {len(val_split):,} images ({val_name}), "
        f"stem={config.stem}{f', input crop {config.input_crop}' if config.input_crop else ''}, "
        f"{config.optimizer} lr {config.learning_rate:g} {config.schedule}, "
        + (f"momentum {config.momentum:g} -> {config.base_momentum:g} -> {config.momentum:g}, "
           if config.cycle_momentum else "")
        + f"weight decay {config.weight_decay:g} (decoupled, "
        f"{'all parameters' if config.decay_norm_and_bias else 'kernels'}), precision={config.precision}, "
        f"oneDNN {'on' if distribute.onednn_enabled() else ONEDNN_OFF}"
        + (f", distilled from {len(config.teachers)} teacher(s) (weight {config.distill_weight:g}, temperature "
           f"{config.distill_temperature:g}; training accuracy is agreement with the soft targets' top class)"
           if config.teachers else "")
        + (f", weights averaged from epoch {config.average_from_epoch} (the average is validated and kept)"
           if config.average_from_epoch else "")
    )

    previous_policy = keras.config.dtype_policy()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        keras.config.set_dtype_policy(config.precision)
        with strategy.scope():
            model = resnet18(
                config.stem, config.input_channels, dropout=config.dropout,
                sync_batchnorm=config.sync_batchnorm, input_crop=config.input_crop,
            )
            if init_source is not None:
                copy_weights(init_source[0], model, init_from)
                print(f"initial weights from {init_source[1]['path']}")
            optimizer = build_optimizer(config, steps, model)
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
                # Weighted: a padded validation set marks its padding by weight 0 (pipeline.eval_dataset).
                weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                steps_per_execution=config.steps_per_execution,
                jit_compile=False,
            )
            # Slots must exist before a checkpoint's values can be loaded into them; and under the default strategy
            # Keras would otherwise create them inside the first train step, which TensorFlow then traces twice
            # (once to create them, once without): 6 of a small run's 25 s.
            model.optimizer.build(model.trainable_variables)
            if latest:
                load_checkpoint_weights(model, latest[0])
                restored = checkpoint.restore_rng(model, latest[1].get("rng_state", {}))
                expected = len(checkpoint.rng_variables(model))
                if restored < expected:  # dropout then draws other masks than the uninterrupted run would
                    message = (f"{latest[0]}/state.json: restored {restored} of the {expected} dropout random "
                               "states, so this resumed run will not repeat an uninterrupted one exactly")
                    if config.deterministic:
                        raise ConfigError(message + " (--deterministic); resume without it or use a new "
                                                    "--model_dir")
                    logging.warning(message)
                print(f"resuming after epoch {initial_epoch} from {latest[0]}")

        guard = checkpoint.NonFiniteLoss()
        # One device takes a short last batch whole; split over replicas it may leave one with no image.
        padded = replicas > 1 and len(val_split) % config.batch_size != 0
        val_ds = pipeline.eval_dataset(val_split, config.batch_size, pad_to_batch=padded)
        averager = None
        if config.average_from_epoch:
            restored = None
            if latest and initial_epoch >= config.average_from_epoch:
                restored = averaging.load(latest[0], model)
            averager = averaging.WeightAverage(config.average_from_epoch, val_ds, guard, restored)
            averager.set_model(model)
        if latest:
            best_file = out_dir / "best.keras"
            if chief and best[0] == initial_epoch and (
                    not best_file.is_file()
                    or best_file.stat().st_mtime < (latest[0] / "state.json").stat().st_mtime):
                # The run was killed between checkpoint and best.keras.
                with averager.applied() if averager else contextlib.nullcontext():
                    checkpoint.save_best(model, out_dir)
        recorder = checkpoint.RunRecorder(out_dir, ckpt_dir, chief, guard, history, best, config_json, replicas,
                                          averager)
        callbacks = [
            guard,
            checkpoint.MomentumLog(),  # before the two that record it
            *([averager] if averager else []),  # before the two that record the average's validation figures
            *([checkpoint.PaddedValidationLoss(len(val_split), pipeline.padded_size(len(val_split), config.batch_size))]
              if padded else []),
            # The chief's curves are the run's; the other workers' would be copies under workers/<task>/logs.
            *([checkpoint.EpochTensorBoard(str(out_dir / "logs"), update_freq="epoch", write_graph=False,
                                           profile_batch=0)] if chief else []),
            recorder,
        ]
        if initial_epoch < config.epochs:
            train_ds = pipeline.train_dataset(
                train_split, config.batch_size, config.seed, config.epochs, initial_epoch,
                config.augment_config(), deterministic=True, targets=targets,
            )
            try:
                model.fit(
                    train_ds,
                    validation_data=val_ds,
                    epochs=config.epochs,
                    initial_epoch=initial_epoch,
                    steps_per_epoch=steps,
                    callbacks=callbacks,
                    verbose=config.verbose,
                    shuffle=False,  # the dataset is already shuffled per (seed, epoch)
                )
            except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                    tf.errors.AbortedError) as e:
                if config.strategy != "multi_worker":
                    raise
                kept = checkpoint.latest_checkpoint(ckpt_dir)
                done = f"epochs up to {kept[1]['epoch']} are kept" if kept else "no epoch was completed"
                first = (e.message or type(e).__name__).strip().splitlines()[0][:160]
                raise WorkerLostError(
                    f"multi-worker training lost a worker ({type(e).__name__}: {first}); {done}; "
                    "rerun every worker with the same command to resume"
                ) from None
        if guard.failed_at is not None:
            epoch, batch, value, what = guard.failed_at
            kept = checkpoint.latest_checkpoint(ckpt_dir)
            where = (f"the last good checkpoint is {kept[0]} (other settings need a new --model_dir)" if kept
                     else "no checkpoint was written, so the same --model_dir may be rerun with other settings")
            raise FerError(
                f"training stopped: the {what} became {value} at epoch {epoch}"
                + (f", batch {batch}" if batch else "")
                + f"; {where}. Lower --learning_rate"
                + (" or use --precision=float32" if config.precision != "float32" else "")
            )
    finally:
        keras.config.set_dtype_policy(previous_policy)

    export_path = None
    best_epoch, best_val = recorder.best_epoch, recorder.best_val
    if chief and export_base is not None and (model_dir / "best.keras").is_file():
        export_path = _export_once(model_dir, config, best_epoch, best_val, val_split, val_name, export,
                                   data_record)
    if chief:
        best_file = model_dir / "best.keras"
        print(
            f"best validation accuracy {best_val:.2%} ({val_name}) at epoch {best_epoch}; "
            + (f"model: {best_file}" if best_file.is_file() else "no best.keras: that epoch's model was replaced by "
               "an epoch whose checkpoint was damaged (see the warning at the start)")
            + (f"; export: {export_path}" if export_path else "")
        )
    return TrainResult(model_dir, history, best_epoch, best_val, export_path, initial_epoch, replicas)


def _forget_lost_epochs(model_dir: Path, state: dict) -> None:
    """Before a resume from ``state`` rewrites history.csv: the best.keras of an epoch after it (its checkpoint
    damaged) is set aside, and an export.json naming such an epoch is removed so that the rerun exports its own
    best model (the export stays)."""
    from fer_keras import checkpoint

    checkpoint.set_aside_lost_best(model_dir, state)
    exported = (_read_export_marker(model_dir) or {}).get("best_epoch")
    if isinstance(exported, int) and exported > state["epoch"]:
        (model_dir / EXPORT_MARKER).unlink()


def _read_export_marker(model_dir: Path) -> dict | None:
    """The run's record of its export (path, best epoch, TTA); None when it has none or it is damaged, which only
    means that the run exports again."""
    try:
        done = json.loads((model_dir / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def _export_once(model_dir: Path, config: TrainConfig, best_epoch: int, best_val: float, val_split,
                 val_name: str, export_mod, data_record: dict) -> Path:
    """Exports best.keras once per run and export settings: a rerun of a finished run adds no version, unless
    it asks for another export folder, name, version or TTA. The path returned is spelled as ``--export_dir``
    is, on a rerun as on the first run (the marker's absolute one made a rerun print another path)."""
    base = Path(os.path.abspath(config.export_dir)) / config.resolved_export_name
    done = _read_export_marker(model_dir)
    if done is not None:
        try:
            path = Path(os.path.abspath(done["path"]))
            if (path.is_dir() and done.get("best_epoch") == best_epoch and path.parent == base
                    and done.get("export_tta", config.export_tta) == config.export_tta
                    and done.get("export_crop_size", [DEFAULT_CROP_SIZE]) == list(config.export_crop_size)
                    and config.export_version in (0, int(path.name))):
                return Path(config.export_dir) / config.resolved_export_name / path.name
        except (ValueError, KeyError, TypeError):
            pass
    from fer_keras.model import as_float32, load_keras_model

    # The TTA is chosen on the model as it will be served: float32 even when trained in mixed precision.
    model = as_float32(load_keras_model(str(model_dir / "best.keras")))
    # export.run_metadata's fields, from the run itself: it would read them back from history.csv, to 6 digits.
    metadata = {
        "model_dir": str(model_dir.resolve()),
        "best_epoch": best_epoch,
        "val_accuracy": best_val,
        "val_split": val_name,
        "train_config": config.to_json(),
        "data": data_record,  # the images it trained and selected on, by fingerprint: distill.hold_out_risk
    }
    tta, crop = export_mod.resolve_tta(model, config.export_tta, val_split, val_name, metadata,
                                       list(config.export_crop_size), config.export_tta_tolerance)
    path = export_mod.export_model(
        model, config.export_dir, config.resolved_export_name, config.export_version or None, tta,
        metadata=metadata, crop_size=crop,
    )
    atomic_write_text(model_dir / EXPORT_MARKER, json.dumps({"path": os.path.abspath(path), "best_epoch": best_epoch,
                                                          "export_tta": config.export_tta,
                                                          "export_crop_size": list(config.export_crop_size)}) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Entrypoint


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags in ``flag_values``: the program's own, or a fresh set to read a stage's recipe with
    (fer_keras.recipe)."""
    d = TrainConfig()
    f = cli.FlagDefiner(flag_values)
    f.DEFINE_string("data", d.data, "FER2013 source: fer2013.csv[.gz], train.csv/test.csv (or their folder), "
                    "or an image folder. Empty: the sample bundled in the package.")
    f.DEFINE_string("model_dir", d.model_dir, "Run directory: logs, checkpoints, history, best.keras. "
                    "Rerunning with the same directory resumes.")
    f.DEFINE_float("val_fraction", d.val_fraction, "Stratified validation fraction when the data has no PublicTest.")
    f.DEFINE_boolean("skip_bad_rows", d.skip_bad_rows, "Skip malformed rows/images (reported) instead of failing.")
    f.DEFINE_boolean("use_cache", d.use_cache, "Cache parsed data, and each --teachers model's probabilities of the "
                     "training images, in $FER_KERAS_CACHE (~/.cache/fer_keras).")
    f.DEFINE_integer("max_train_examples", d.max_train_examples, "Use a stratified subset of about this size (0: "
                     "all): each class keeps its share, rounded, so it may come out an image or two short.")
    f.DEFINE_integer("max_val_examples", d.max_val_examples, "Use a stratified validation subset of about this size "
                     "(0: all), drawn as --max_train_examples.")
    f.DEFINE_enum("stem", d.stem, list(STEMS),
                  "imagenet: 7x7/2 conv + 3x3/2 pool (torchvision); cifar_pool: 3x3 conv + 2x2 pool; cifar: 3x3 conv.")
    f.DEFINE_enum("input_channels", str(d.input_channels), ["1", "3"],
                  "1, or 3 (grey repeated; torchvision's parameter count).")
    f.DEFINE_float("dropout", d.dropout, "Dropout before the classifier.")
    f.DEFINE_integer("input_crop", d.input_crop, "The network sees only the central INPUT_CROP pixels square "
                     "(0: all 48), as the published 40x40-crop recipes' networks do, at fewer multiply-adds (0.77 "
                     "for cifar_pool at 40): training shifts each image by whole pixels so that the window is a "
                     "random crop, and ten-crop TTA shows it windows of its own size. Must be smaller than 48 by an "
                     "even number.")
    f.DEFINE_boolean("sync_batchnorm", d.sync_batchnorm, "BatchNorm statistics over the global batch "
                     "(all replicas) rather than per replica.")
    f.DEFINE_string("init_from", d.init_from, "Start from this model's weights instead of random ones: a .keras "
                    "file, a run directory (its best.keras), a TF Serving export such as saved_models/fer_resnet18 "
                    "(its highest version), or a recipe's flagfile flags/NAME.cfg: the model it trains, in the folder "
                    "NAME beside --model_dir, trained (or resumed) first; same --stem and --input_channels. The "
                    "optimizer and schedule start afresh: fine-tuning, or a further learning-rate cycle after a "
                    "finished run.")
    f.DEFINE_list("teachers", [], "Knowledge distillation: trained models (each a .keras file, run directory, TF "
                  "Serving export or recipe flagfile, as --init_from takes) whose mean probabilities, computed once "
                  "on the un-augmented training images, soften the training targets. Empty: one-hot labels.")
    f.DEFINE_enum("teacher_tta", d.teacher_tta, list(TTA_MODES), "--teachers: the test-time augmentation averaged "
                  "for a teacher without its own (an export with TTA built in is run as it serves).")
    f.DEFINE_float("distill_weight", d.distill_weight, "--teachers: the teachers' share of each target; "
                   "(1 - DISTILL_WEIGHT) stays on the image's label. --label_smoothing then applies to this target "
                   "as to a one-hot label: the loss fits (1 - S) x target + S/7, S = LABEL_SMOOTHING (0.1 in the "
                   "recipes: 0.9 x [(1 - W) x label + W x teachers] + 0.1/7).")
    f.DEFINE_float("distill_temperature", d.distill_temperature, "--teachers: each teacher's probabilities p "
                   "(averaged over its views) become p^(1/T), renormalised (for one view, its logits divided by T): "
                   "above 1 softer, below 1 sharper.")
    f.DEFINE_integer("epochs", d.epochs, "Number of epochs.")
    f.DEFINE_integer("average_from_epoch", d.average_from_epoch, "Stochastic weight averaging: from this epoch "
                     "(1-based) on, the model validated, kept as best.keras and exported is the mean of the weights "
                     "(BatchNorm statistics included) at the ends of the epochs since, best with a constant or "
                     "cycled --learning_rate that keeps SGD moving; history.csv keeps the current weights' "
                     "validation figures as val_raw_*. 0: off.")
    f.DEFINE_integer("batch_size", d.batch_size, "Global batch size (split over replicas; must divide evenly).")
    f.DEFINE_enum("optimizer", d.optimizer, OPTIMIZERS, "sgd (Nesterov momentum) or adamw.")
    f.DEFINE_float("learning_rate", d.learning_rate, "Peak learning rate.")
    f.DEFINE_float("momentum", d.momentum, "SGD momentum (with --cycle_momentum its highest value).")
    f.DEFINE_boolean("cycle_momentum", d.cycle_momentum, "With --schedule=onecycle and sgd: momentum falls from "
                     "--momentum to --base_momentum while the learning rate rises and returns while it falls, as "
                     "PyTorch's OneCycleLR does (its defaults, 0.95 and 0.85, need --momentum=0.95). Off: "
                     "momentum stays --momentum.")
    f.DEFINE_float("base_momentum", d.base_momentum, "--cycle_momentum: the lowest momentum, at the learning "
                   "rate's peak.")
    f.DEFINE_float("weight_decay", d.weight_decay, "Decoupled weight decay on conv/dense kernels (not BN, not "
                   "biases, unless --decay_norm_and_bias): each step w -= lr * weight_decay * w. PyTorch's SGD "
                   "weight_decay adds to the gradient instead, where momentum m amplifies it by 1/(1-m): its 5e-4 at "
                   "m=0.9 is 5e-3 here.")
    f.DEFINE_boolean("decay_norm_and_bias", d.decay_norm_and_bias, "Apply --weight_decay to BatchNorm's "
                     "scales/offsets and the classifier's bias too, as PyTorch's SGD weight_decay covers every "
                     "parameter. Off: kernels only, the usual choice for BatchNorm networks.")
    f.DEFINE_enum("schedule", d.schedule, SCHEDULES, "Learning-rate schedule: cosine (linear warm-up from lr/10, "
                  "cosine to 0), onecycle (PyTorch's OneCycleLR: cosine ramp from lr/25 over --warmup_epochs, "
                  "cosine to lr/2.5e5; momentum cycles only with --cycle_momentum), step (--step_epochs) or "
                  "constant.")
    f.DEFINE_float("warmup_epochs", d.warmup_epochs, "Epochs of rising learning rate (cosine, onecycle; for "
                   "onecycle PyTorch's pct_start x epochs, fewer than --epochs).")
    f.DEFINE_list("step_epochs", [], "Epochs at which the step schedule multiplies the rate by step_gamma.")
    f.DEFINE_float("step_gamma", d.step_gamma, "Step-schedule factor.")
    f.DEFINE_float("label_smoothing", d.label_smoothing, "Label smoothing of the cross-entropy.")
    f.DEFINE_enum("precision", d.precision, PRECISIONS, "Keras dtype policy; logits stay float32.")
    f.DEFINE_integer("steps_per_execution", d.steps_per_execution, "Training steps per tf.function call; must divide "
                     "the steps of an epoch (checked once the data is read).")
    cli.define_seed(d.seed, "Seed of weights, data order and augmentation.", flag_values)
    f.DEFINE_boolean("deterministic", d.deterministic, "Enable TF op determinism (bit-identical reruns).")
    f.DEFINE_boolean("flip", d.flip, "Augment: random horizontal flip.")
    f.DEFINE_float("shift", d.shift, "Augment: max shift as a fraction of the side (0 = off).")
    f.DEFINE_float("rotation", d.rotation, "Augment: max rotation in degrees (0 = off).")
    f.DEFINE_float("zoom", d.zoom, "Augment: max zoom in/out fraction (0 = off).")
    f.DEFINE_float("erasing", d.erasing, "Augment: random-erasing probability (0 = off).")
    f.DEFINE_float("erasing_max_area", d.erasing_max_area, "Augment: largest fraction of the image one erased "
                   "rectangle covers (the smallest is 0.02; torchvision's RandomErasing: 0.33).")
    f.DEFINE_enum("erasing_fill", d.erasing_fill, list(ERASING_FILLS), "Augment: what random erasing writes: "
                  "noise (uniform 0-255) or mean (the data set's mean grey, as torchvision's RandomErasing(value=0) "
                  "after Normalize).")
    f.DEFINE_float("mixup", d.mixup, "Augment: mixup with weights from Beta(mixup, mixup), labels mixed "
                   "alike (0 = off; 0.2-1 is usual).")
    f.DEFINE_enum("fill_mode", d.fill_mode, list(FILL_MODES), "Augment: what the shift/rotation/zoom warp puts "
                  "where it looks outside the image: reflect the image, constant black (torchvision's fill=0), "
                  "or nearest (repeat the edge).")
    f.DEFINE_enum("strategy", d.strategy, ["default", "one_device", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy; multi_worker reads TF_CONFIG; tpu is untested.")
    f.DEFINE_integer("cpu_devices", d.cpu_devices,
                     "Logical CPU devices, for --strategy=mirrored only (0: 2 for mirrored on a CPU-only "
                     "machine, else 1).")
    f.DEFINE_integer("num_gpus", d.num_gpus, "GPUs to use with mirrored (-1: all); one_device takes the first "
                     "GPU, or the CPU with 0; default and multi_worker ignore it.")
    f.DEFINE_string("tpu_address", d.tpu_address, "TPU name or grpc:// address for --strategy=tpu.")
    f.DEFINE_float("collective_timeout", d.collective_timeout, "multi_worker: seconds a collective may wait "
                   "for the other workers before the run fails (0: wait forever). TensorFlow enforces it with a "
                   "thread per collective (its docs call it a debugging aid); 0 saves that where a lost worker "
                   "is detected otherwise.")
    f.DEFINE_boolean("export", d.export, "Export the best model for TF Serving at the end.")
    f.DEFINE_string("export_dir", d.export_dir, "Base folder of exports: EXPORT_DIR/EXPORT_NAME/VERSION.")
    f.DEFINE_string("export_name", d.export_name, "Model name of the export (empty: the --model_dir folder's "
                    "name; the shipped model is fer_resnet18).")
    f.DEFINE_integer("export_version", d.export_version, "Export version (0: next free; never overwrites).")
    f.DEFINE_enum("export_tta", d.export_tta, EXPORT_TTAS, "Test-time augmentation built into the export "
                  "(tencrop: 10 model evaluations per image, --export_crop_size crops); auto measures the three on "
                  "the validation split and builds in the cheapest within --export_tta_tolerance of the best.")
    f.DEFINE_list("export_crop_size", [str(c) for c in d.export_crop_size], "Ten-crop's crop side in pixels; with "
                  "--export_tta=auto, comma-separated sides (e.g. 40,42,44) are each measured and the most accurate "
                  "built in.")
    f.DEFINE_float("export_tta_tolerance", d.export_tta_tolerance, "--export_tta=auto: percentage points by "
                   "which a costlier TTA must beat a cheaper one to be built in.")
    f.DEFINE_integer("verbose", d.verbose, "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.")
    f.DEFINE_boolean("dry_run", False, "Print the recipe stages this run would train first (the recipes that "
                     "--init_from and --teachers name, and theirs), each with its folder and state, and exit.")

    positive = {"epochs": 1, "batch_size": 1, "steps_per_execution": 1}
    for name, low in positive.items():
        f.register_validator(name, lambda v, low=low: v >= low, f"--{name} must be >= {low}")
    f.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0")
    f.register_validator("weight_decay", lambda v: v >= 0, "--weight_decay must be >= 0")
    f.register_validator("momentum", lambda v: 0 <= v < 1, "--momentum must be in [0, 1)")
    f.register_validator("base_momentum", lambda v: 0 < v < 1, "--base_momentum must be in (0, 1)")
    f.register_validator("label_smoothing", lambda v: 0 <= v < 1, "--label_smoothing must be in [0, 1)")
    f.register_validator("dropout", lambda v: 0 <= v < 1, "--dropout must be in [0, 1)")
    f.register_validator("distill_weight", lambda v: 0 <= v <= 1, "--distill_weight must be in [0, 1]")
    f.register_validator("distill_temperature", lambda v: v > 0, "--distill_temperature must be > 0")
    f.register_validator("teachers", lambda v: all(p.strip() for p in v), "--teachers: an empty path")
    f.register_validator("input_crop", lambda v: v == 0 or (0 < v < 48 and v % 2 == 0),
                         "--input_crop must be 0 (none) or an even number below 48")
    f.register_validator("val_fraction", lambda v: 0 < v < 1, "--val_fraction must be in (0, 1)")
    f.register_validator("warmup_epochs", lambda v: v >= 0, "--warmup_epochs must be >= 0")
    f.register_validator("cpu_devices", lambda v: v >= 0, "--cpu_devices must be >= 0")
    f.register_validator("collective_timeout", lambda v: v >= 0, "--collective_timeout must be >= 0")
    f.register_validator("export_version", lambda v: v >= 0, "--export_version must be >= 0")
    f.register_validator("step_gamma", lambda v: 0 < v <= 1, "--step_gamma must be in (0, 1]")
    f.register_validator("num_gpus", lambda v: v >= -1, "--num_gpus must be >= -1 (-1: all)")
    f.register_validator("export_tta_tolerance", lambda v: v >= 0, "--export_tta_tolerance must be >= 0")
    f.register_validator("export_crop_size", crop_sides_ok,
                         f"--export_crop_size must be one or more whole numbers in 1-{IMAGE_SIZE}, comma-separated")
    f.register_multi_flags_validator(
        ["export_tta", "export_crop_size"], lambda d: d["export_tta"] == AUTO or len(set(d["export_crop_size"])) <= 1,
        "several --export_crop_size sides are measured only with --export_tta=auto; give one otherwise")
    f.register_validator("shift", lambda v: 0 <= v <= 0.5, "--shift must be in [0, 0.5]")
    f.register_validator("rotation", lambda v: 0 <= v <= 180, "--rotation must be in [0, 180]")
    f.register_validator("zoom", lambda v: 0 <= v < 1, "--zoom must be in [0, 1)")
    f.register_validator("erasing", lambda v: 0 <= v <= 1, "--erasing must be in [0, 1]")
    f.register_validator("erasing_max_area", lambda v: 0.02 < v <= 1, "--erasing_max_area must be in (0.02, 1]")
    f.register_validator("mixup", lambda v: v >= 0, "--mixup must be >= 0")
    f.register_validator("step_epochs", lambda v: all(s.strip().isdecimal() and int(s) > 0 for s in v),
                         "--step_epochs must be positive integers, e.g. 30,45")
    f.register_validator("verbose", lambda v: v in (0, 1, 2), "--verbose must be 0, 1 or 2")
    f.register_validator("average_from_epoch", lambda v: v >= 0, "--average_from_epoch must be >= 0 (0: off)")
    for name in FLOAT_FIELDS:  # absl's float parser takes inf and nan, which no setting here means
        f.register_validator(name, math.isfinite, f"--{name} must be a finite number")
    f.register_validator("model_dir", lambda v: bool(v.strip()), "--model_dir must name a folder (empty would "
                         "train into the current directory)")


FLOAT_FIELDS = tuple(field.name for field in dataclasses.fields(TrainConfig) if field.type == "float")


def flag_args(settings: dict) -> list[str]:
    """Settings as ``--name=value`` flags that this tool parses back to the same values (lists comma-separated)."""
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in settings.items()]


def config_from_args(args: Sequence[str]) -> TrainConfig:
    """The validated settings that ``python -m fer_keras.train ARGS`` would run with, read into a fresh set of flags
    (the program's own are untouched); a bad flag or setting is a one-line ConfigError."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    cli.read_flags(flag_values, ["fer_keras.train", *args])
    config = config_from_flags(flag_values)
    config.validate()
    return config


def config_from_flags(values: Any) -> TrainConfig:
    kwargs = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(values, field.name)
        if field.name == "input_channels":
            value = int(value)
        elif field.name == "step_epochs":
            value = tuple(int(s) for s in value)
        elif field.name == "teachers":
            value = tuple(value)
        elif field.name == "export_crop_size":
            value = tuple(int(c) for c in value)
        kwargs[field.name] = value
    return TrainConfig(**kwargs)


def dry_run(config: TrainConfig) -> str:
    """What ``run(config)`` would train, before it: ``--dry_run``'s report. Reads no data and loads no model."""
    from fer_keras import checkpoint, recipe

    config.validate()
    latest = checkpoint.latest_checkpoint(Path(config.model_dir) / "checkpoints")
    if latest is not None:
        return recipe.describe(config, [], latest[1]["epoch"])
    return recipe.describe(config, recipe.plan(config), 0)


def main(argv: Sequence[str]) -> None:
    config = config_from_flags(flags.FLAGS)
    if flags.FLAGS.dry_run:
        print(dry_run(config))
        return
    run(config)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
