"""Export for TF Serving: ``BASE/NAME/VERSION/`` SavedModels that take raw pixels.

Signatures (each returns ``probabilities`` [N,7] float32, ``class_id`` [N] int64, ``class_name`` [N]
string and ``logits`` [N,7] float32):

* ``serving_default``: float32 pixels ``[N, 48, 48, 1]`` in 0-255 (what TF Serving's REST JSON gives);
* ``serving_uint8``: the same as uint8 (compact gRPC tensors, decoded PNGs);
* ``serving_no_tta`` (only in an export with TTA built in): float32 pixels, the image alone, for clients to whom
  one forward pass per image matters more than the TTA's gain (ten-crop's throughput is a fifth of flip's).

With ``tta="flip"`` the export averages the probabilities of the image and its mirror image, with
``tta="tencrop"`` those of ten crops (:mod:`fer_keras.tta`, the same views as the evaluate tool's);
``--tta=auto`` measures all three on the split that selected the run's epoch and builds in the cheapest
within ``--tta_tolerance`` points of the best (:func:`fer_keras.tta.choose_tta`), recording the figures.
Versions are written to a hidden temporary folder and renamed into place, so TF Serving never sees a
half-written version, and an existing version is never overwritten.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from absl import flags

from fer_keras import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, __version__, cli
from fer_keras.errors import ConfigError, FerError, ModelError
from fer_keras.history import (
    best_row,
    check_creatable,
    is_version_name,
    read_config,
    read_data_record,
    read_history_csv,
    remove_dead_writers_tmp,
    tmp_name,
)
from fer_keras.tta import (
    AUTO,
    DEFAULT_CROP_SIZE,
    DEFAULT_TOLERANCE,
    NO_TTA_SIGNATURE,
    TTA_MODES,
    TtaChoice,
    check_tta,
    choose_tta,
    crop_sides,
    crop_sides_ok,
    effective_crop,
    num_views,
    tf_views,
)

if TYPE_CHECKING:
    import keras
    import numpy as np
    import tensorflow as tf

    from fer_keras.data import Split

METADATA_FILE = "assets.extra/fer_keras.json"
MODEL_CONFIG_FILE = "assets.extra/keras_model.json"


def existing_versions(base: Path) -> list[int]:
    """The version numbers taken in ``base``: by folders, and by files too, which a new version could not replace."""
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if is_version_name(p.name))


def next_version(base: Path) -> int:
    versions = existing_versions(base)
    return versions[-1] + 1 if versions else 1


SERVING_CHECKS = ("pixels finite and in 0-255, else INVALID_ARGUMENT", "an empty batch gets empty outputs")


def serving_function(model: keras.Model, tta: str = "none", crop_size: int = DEFAULT_CROP_SIZE,
                     ) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """Raw pixels -> dict of outputs; the body of both serving signatures.

    All views go through the model as one batch; probabilities and logits are their means.
    """
    import tensorflow as tf

    from fer_keras.model import input_crop_of

    check_tta(tta, crop_size)
    names = tf.constant(list(CLASS_NAMES))
    count = num_views(tta)
    model_crop = input_crop_of(model)

    def views_logits(x):
        logits = tf.cast(model(tf_views(x, tta, crop_size, model_crop), training=False), tf.float32)
        return tf.reshape(logits, [count, -1, NUM_CLASSES])

    def serve(pixels):
        x = tf.cast(pixels, tf.float32)
        # Raw grey levels only: NaN, infinities and values outside 0-255 (a client that scaled or normalised the
        # image) get an INVALID_ARGUMENT error instead of confident nonsense. NaN fails both comparisons.
        message = "pixels must be raw grey levels in 0-255 (not scaled or normalised, no NaN)"
        checks = [tf.debugging.assert_greater_equal(x, 0.0, message=message),
                  tf.debugging.assert_less_equal(x, 255.0, message=message)]
        with tf.control_dependencies(checks):
            x = tf.identity(x)
        # An empty batch is answered without the model: oneDNN's strided convolution returns the wrong shape for
        # one (TensorFlow 2.21), and the request would fail instead of getting empty outputs.
        logits = tf.cond(tf.shape(x)[0] > 0, lambda: views_logits(x),
                         lambda: tf.zeros([count, 0, NUM_CLASSES], tf.float32))
        probabilities = tf.reduce_mean(tf.nn.softmax(logits), axis=0)
        logits = tf.reduce_mean(logits, axis=0)
        class_id = tf.argmax(probabilities, axis=-1)
        return {
            "probabilities": probabilities,
            "class_id": class_id,
            "class_name": tf.gather(names, class_id),
            "logits": logits,
        }

    return serve


def _data_record(run_dir: Path) -> dict | None:
    """The run's data.json, or None when it cannot be read: the export's metadata and checks then go without it
    (training, which writes it, stops on an unreadable one instead)."""
    try:
        return read_data_record(run_dir)
    except OSError:
        return None


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise ConfigError(f"{target}: export version {target.name} exists; it is never overwritten")


def export_model(
    model: keras.Model,
    base_dir: str | os.PathLike = "saved_models",
    name: str = "fer_resnet18",
    version: int | None = None,
    tta: str = "none",
    metadata: dict | None = None,
    crop_size: int = DEFAULT_CROP_SIZE,
) -> Path:
    """Writes ``base_dir/name/version`` atomically and returns its path.

    ``version=None`` takes the next free integer; an explicit version that exists is an error.
    ``tta`` (none, flip, tencrop with ``crop_size``) is built into ``serving_default`` and ``serving_uint8``; with
    one, ``serving_no_tta`` serves the image alone.
    """
    import keras
    import tensorflow as tf

    from fer_keras.model import as_float32, check_classifier, input_crop_of

    check_tta(tta, crop_size)
    check_classifier(model, f"model {model.name!r}")
    base = Path(base_dir) / name
    automatic = version is None
    if automatic:
        version = next_version(base)
    if version < 1:
        raise ConfigError(f"export version must be a positive integer, got {version}")
    target = base / str(version)
    _refuse_existing(target)
    base.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_tmp(base)
    tmp = base / tmp_name(str(version))
    model = as_float32(model)
    model_crop = input_crop_of(model)
    serve = serving_function(model, tta, crop_size)
    archive = keras.export.ExportArchive()
    # Not archive.track(model): it records the keras.Variable wrappers while the endpoints capture the
    # tf.Variables inside them, and TensorFlow, unable to tell they are the same, writes every weight twice
    # (keras-team/keras#23553; 90 MB instead of 45 for ResNet-18). The endpoints track what they use; the
    # "variables" collection, in model order, lets inference.load_keras copy the weights back.
    tf_variables = [v.value for v in model.variables]
    if not all(isinstance(v, tf.Variable) for v in tf_variables):
        raise ModelError("cannot export: the model's variables are not TensorFlow variables")
    archive.add_variable_collection("variables", tf_variables)
    shape = [None, IMAGE_SIZE, IMAGE_SIZE, 1]
    endpoints = {"serving_default": (serve, tf.float32), "serving_uint8": (serve, tf.uint8)}
    if tta != "none":
        endpoints[NO_TTA_SIGNATURE] = (serving_function(model, "none"), tf.float32)
    for signature, (function, dtype) in endpoints.items():
        # The plain function: add_endpoint makes the tf.function (autograph off) itself; one of ours inside it added
        # a trace of its own, 4 traces of the network per signature instead of 2.
        archive.add_endpoint(signature, function, input_signature=[tf.TensorSpec(shape, dtype, name="pixels")])
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel("WARNING")  # SavedModel writing logs one INFO line per captured variable
    try:
        archive.write_out(str(tmp), verbose=False)
        info = {  # the caller's record first: what the export itself is cannot be overridden by it
            **(metadata or {}),
            "fer_keras_version": __version__,
            "class_names": list(CLASS_NAMES),
            "input": "pixels: [N, 48, 48, 1] raw grayscale 0-255 (float32 in serving_default, uint8 in serving_uint8)",
            "outputs": ["probabilities", "class_id", "class_name", "logits"],
            # What the serving graph checks (exports before session 24 had none of it; their metadata lacks this).
            "serving_checks": list(SERVING_CHECKS),
            "signatures": list(endpoints),
            "tta": tta,
            **({"crop_size": effective_crop(crop_size, model_crop)} if tta == "tencrop" else {}),
            "input_crop": model_crop,
        }
        (tmp / "assets.extra").mkdir(exist_ok=True)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
        # Lets fer_keras rebuild the Keras model (for gradients: saliency, filters) from the export.
        (tmp / MODEL_CONFIG_FILE).write_text(model.to_json())
        target = _rename_into_place(tmp, base, target, automatic)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        tf_logger.setLevel(level)
    return target


def _rename_into_place(tmp: Path, base: Path, target: Path, automatic: bool) -> Path:
    """Renames the finished ``tmp`` to ``target``. Another export may have taken that version since it was chosen:
    an automatic version then moves to the next free one; a version the user named is never overwritten."""
    while True:
        try:
            os.rename(tmp, target)
            return target
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not automatic:
                raise ConfigError(f"{target}: export version {target.name} was written by another export meanwhile; "
                                  "it is never overwritten") from None
            target = base / str(next_version(base))


def model_file(path: str | os.PathLike) -> Path:
    """The ``.keras`` file that ``path`` names: itself, or a training run directory's ``best.keras``."""
    path = Path(path)
    if not path.exists():
        raise FerError(f"{path}: no such model file or directory")
    if path.is_dir():
        if not (path / "best.keras").is_file():
            raise FerError(f"{path}: no best.keras in this directory (is it a training run's --model_dir?)")
        path = path / "best.keras"
    return path


def load_for_export(path: str | os.PathLike) -> keras.Model:
    """A ``.keras`` file, or a training run directory (its ``best.keras``)."""
    from fer_keras.model import load_keras_model

    return load_keras_model(str(model_file(path)))


def run_metadata(run_dir: Path) -> dict:
    """What a training run directory tells about its best model, for the export's fer_keras.json."""
    info: dict = {"model_dir": str(run_dir.resolve()), "train_config": read_config(run_dir)}
    try:
        rows = read_history_csv(run_dir / "history.csv")
    except (OSError, ValueError, FerError):  # a damaged history: the export then says less about its run
        return info
    if rows:
        best = best_row(rows)
        info.update(best_epoch=best["epoch"], val_accuracy=best["val_accuracy"])
    record = _data_record(run_dir)  # the split val_accuracy was measured on, as training's exports record it
    if record and isinstance(record["val"].get("name"), str):
        info["val_split"] = record["val"]["name"]
    if record:
        info["data"] = record
    return info


def choose_served_tta(model: keras.Model, images: np.ndarray, labels: np.ndarray, split: str,
                      crop_size: int | Sequence[int] = DEFAULT_CROP_SIZE,
                      tolerance: float = DEFAULT_TOLERANCE) -> TtaChoice:
    """:func:`fer_keras.tta.choose_tta` for a Keras model about to be exported."""
    from fer_keras.inference import Predictor

    return choose_tta(Predictor("keras", Path("<model>"), keras_model=model), images, labels, split,
                      crop_size=crop_size, tolerance=tolerance)


def _one_side(tta: str, crop_size: int | Sequence[int]) -> int:
    """The crop side of a TTA given, not chosen: several sides are a choice only ``auto`` makes."""
    sides = crop_sides(crop_size)
    if len(sides) != 1:
        raise ConfigError(f"ten-crop crop sides {', '.join(map(str, sides))}: several are measured only with "
                          f"--tta=auto; give one with --tta={tta}")
    return sides[0]


def resolve_tta(model: keras.Model, tta: str, split: Split, split_name: str, metadata: dict,
                crop_size: int | Sequence[int] = DEFAULT_CROP_SIZE,
                tolerance: float = DEFAULT_TOLERANCE) -> tuple[str, int]:
    """``(tta, crop side)``: ``tta`` itself with the (one) crop side given, or for ``auto`` the measured choice,
    printed and recorded in ``metadata``, with the most accurate of the ten-crop crop sides given."""
    if tta != AUTO:
        return tta, _one_side(tta, crop_size)
    choice = choose_served_tta(model, split.images, split.labels, split_name, crop_size, tolerance)
    print(choice.summary(), flush=True)
    metadata["tta_selection"] = choice.to_json()
    return choice.mode, choice.crop_size


def selection_split(data_path: str | None, run_config: dict, run_dir: Path | None = None) -> tuple[Split, str, str]:
    """The labelled split a run selected its epoch on (PublicTest, or its hold-out), its name and the data's
    source; ``data_path`` None means the data the run recorded (else the bundled sample). With ``run_dir``, images
    that differ from those its ``data.json`` records are refused: a choice made on them would be recorded as made
    on the run's split."""
    from fer_keras import data as fer_data
    from fer_keras.train import TrainConfig, selection_split_of

    recorded = TrainConfig.recorded(run_config)
    dataset = fer_data.load(data_path or recorded.get("data") or None, skip_bad_rows=bool(recorded["skip_bad_rows"]),
                            use_cache=bool(recorded["use_cache"]))
    val, name = selection_split_of(dataset, recorded)
    if run_dir is not None:
        record = _data_record(run_dir)
        chose_on = record["val"].get("sha256") if record else None  # none recorded: nothing to compare with
        if chose_on and val.fingerprint() != chose_on:
            raise ConfigError(f"{dataset.source}: its {name} images differ from those {run_dir} chose its epoch on "
                              "(data.json); pass the data the run was trained on as --data")
    return val, name, dataset.source


def export_from(model_path: str | os.PathLike, export_dir: str | os.PathLike = "saved_models", name: str = "",
                version: int = 0, tta: str = "none", data: str | None = None,
                crop_size: int | Sequence[int] = DEFAULT_CROP_SIZE,
                tolerance: float = DEFAULT_TOLERANCE) -> tuple[Path, str]:
    """Exports a run directory or ``.keras`` file; returns (the version folder, the TTA built in). The name
    defaults to the run's folder (or the file's stem); ``tta="auto"`` chooses on the split that chose the
    run's epoch, measuring the model in float32 as it will be served, and ten-crop with each of several crop
    sides (``crop_size`` a sequence) keeps the most accurate."""
    from fer_keras.model import as_float32

    keras_file = model_file(model_path)  # a missing model is named before the run's records are read
    source = Path(model_path).resolve()
    # A run's record describes its best.keras only, not other .keras files that may lie beside it.
    in_run = source.name == "best.keras" and (source.parent / "config.json").is_file()
    run_dir = source if source.is_dir() else source.parent if in_run else None
    name = name or (run_dir.name if run_dir else source.stem)
    metadata = {"source": str(source), **(run_metadata(run_dir) if run_dir else {})}
    # export_model would fail on these too, but only after the model's load and minutes of --tta=auto measuring.
    check_creatable(Path(export_dir) / name, "--export_dir or --name", folder=True)
    if version:
        _refuse_existing(Path(export_dir) / name / str(version))
    if tta != AUTO:  # several crop sides are a choice only --tta=auto makes: refused before the model loads
        crop_size = _one_side(tta, crop_size)
    # Loaded only after the run's records and the version pass: a damaged config.json is refused in milliseconds.
    model = as_float32(load_for_export(keras_file))
    if tta == AUTO:
        split, label, _ = selection_split(data, metadata.get("train_config", {}), run_dir)
        tta, crop_size = resolve_tta(model, tta, split, label, metadata, crop_size, tolerance)
    path = export_model(model, export_dir, name, version or None, tta, metadata=metadata, crop_size=crop_size)
    return path, tta


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A .keras file or a training --model_dir (uses its best.keras).")
    flags.DEFINE_string("export_dir", "saved_models", "Base folder of TF Serving exports.")
    flags.DEFINE_string("name", "", "Model name: exports go to EXPORT_DIR/NAME/VERSION (empty: the run "
                        "folder's or .keras file's name).")
    flags.DEFINE_integer("version", 0, "Version to write; 0 takes the next free integer. Never overwrites.")
    flags.DEFINE_enum("tta", "none", TTA_MODES + (AUTO,), "Test-time augmentation built into the export: none, "
                      "flip, tencrop (10 model evaluations per image), or auto: the cheapest of them within "
                      "--tta_tolerance of the best on the run's selection split of --data.")
    flags.DEFINE_list("crop_size", [str(DEFAULT_CROP_SIZE)], "Crop side in pixels for --tta=tencrop; with "
                      "--tta=auto, comma-separated sides (e.g. 40,42,44) are each measured and the most accurate "
                      "built in. A model trained with --input_crop is shown crops of its own size instead.")
    flags.DEFINE_string("data", None, "FER2013 source for --tta=auto (default: the data the run was trained "
                        "on, else the bundled sample); its PublicTest, or the run's hold-out, decides.")
    flags.DEFINE_float("tta_tolerance", DEFAULT_TOLERANCE, "--tta=auto: percentage points by which a costlier "
                       "TTA must beat a cheaper one to be built in.")
    flags.register_validator("tta_tolerance", lambda v: v >= 0, "--tta_tolerance must be >= 0")
    flags.mark_flag_as_required("model")
    flags.register_validator("version", lambda v: v >= 0, "--version must be >= 0")
    flags.register_validator("export_dir", lambda v: bool(v.strip()), "--export_dir must name a folder (empty would "
                             "export into the current directory)")
    flags.register_validator("crop_size", crop_sides_ok,
                         f"--crop_size must be one or more whole numbers in 1-{IMAGE_SIZE}, comma-separated")
    flags.register_multi_flags_validator(
        ["tta", "crop_size"], lambda d: d["tta"] == AUTO or len(set(d["crop_size"] or [])) <= 1,
        "several --crop_size sides are measured only with --tta=auto; give one otherwise")
    flags.register_validator("name", lambda v: not v or (v == v.strip() and "/" not in v and not v.startswith(".")),
                             "--name must be a plain folder name (no spaces around it)")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    path, tta = export_from(f.model, f.export_dir, f.name, f.version, f.tta, f.data, [int(c) for c in f.crop_size],
                            f.tta_tolerance)
    no_tta = "" if tta == "none" else f", {NO_TTA_SIGNATURE}: float32 pixels without the TTA"
    print(f"exported {f.model} to {path} with TTA {tta} (serving_default: float32 pixels, serving_uint8: "
          f"uint8 pixels{no_tta})")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
