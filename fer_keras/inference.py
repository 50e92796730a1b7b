"""Finding and loading a trained model for the analysis tools, whatever form the user has.

Accepted ``--model`` values:

* a ``.keras`` file (loaded in Keras safe mode);
* a training run directory (its ``best.keras``);
* a TF Serving export: ``saved_models/NAME`` (highest version) or ``saved_models/NAME/VERSION``;
* nothing: the model shipped in this repository, ``saved_models/fer_resnet18`` (highest version).

:func:`load_predictor` gives a :class:`Predictor` that returns logits for uint8 or float pixel
batches (exports are run exactly as TF Serving runs them, or as their network alone with ``network_only``);
:func:`load_ensemble` averages several of them.
:func:`load_keras` gives a Keras model
for tools that need layers and gradients (saliency, filters); for an export it rebuilds the
ResNet-18 from the training config stored in the export and copies the exported weights into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from fer_keras.errors import ModelError
from fer_keras.history import is_version_name

if TYPE_CHECKING:
    import keras

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO_ROOT / "saved_models" / "fer_resnet18"
METADATA_FILE = "assets.extra/fer_keras.json"
# What loading a damaged export raises besides tf.errors.OpError; TensorFlow reports a truncated variables
# file as IndexError ("Read less bytes than requested").
_LOAD_ERRORS = (OSError, IndexError, KeyError, TypeError, ValueError)


def resolve(path: str | os.PathLike | None) -> tuple[str, Path]:
    """Returns (kind, path) with kind ``keras`` or ``saved_model``."""
    if path is None or str(path) == "":
        if not SHIPPED_MODEL.is_dir():
            raise ModelError(
                f"no --model given and no shipped model at {SHIPPED_MODEL}; train one with "
                "python -m fer_keras.train or pass --model"
            )
        path = SHIPPED_MODEL
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{p}: no such model file or directory")
    if p.is_file():
        if p.suffix != ".keras":
            raise ModelError(f"{p}: not a .keras file, a run directory or a SavedModel directory")
        return "keras", p
    if (p / "saved_model.pb").is_file():
        return "saved_model", p
    if (p / "best.keras").is_file():
        return "keras", p / "best.keras"
    versions = sorted((int(c.name), c) for c in p.iterdir() if c.is_dir() and is_version_name(c.name)
                      and (c / "saved_model.pb").is_file())
    if versions:
        return "saved_model", versions[-1][1]
    raise ModelError(
        f"{p}: neither a run directory (best.keras), a SavedModel, nor a folder of numbered SavedModel versions"
    )


def find_run_dir(model_path: str | os.PathLike | None) -> Path | None:
    """The training run directory behind ``model_path``: the path itself when it holds best.keras,
    or the folder of a ``best.keras`` file that sits in a run (has config.json); else None."""
    if model_path is None or str(model_path) == "":
        return None
    p = Path(model_path).expanduser()
    if p.is_dir() and (p / "best.keras").is_file():
        return p
    if p.is_file() and p.name == "best.keras" and (p.parent / "config.json").is_file():
        return p.parent
    return None


def training_config(kind: str, model_path: Path, run_dir: Path | None) -> dict | None:
    """The settings a model was trained with: its run's ``config.json``, else those an export records; None when
    neither is known (a ``.keras`` file on its own)."""
    if run_dir is not None and (run_dir / "config.json").is_file():
        from fer_keras.history import read_config

        return read_config(run_dir)
    if kind == "saved_model":
        config = export_metadata(model_path).get("train_config")
        return config if isinstance(config, dict) and config else None
    return None


def model_sha256(kind: str, path: Path) -> str:
    """The identity of a resolved model (:func:`resolve`): the SHA-256 of a ``.keras`` file, or of an export's
    variables (its graph and metadata may be rewritten without changing the weights)."""
    from fer_keras.history import sha256_files

    if kind == "keras":
        return sha256_files([path])
    variables = sorted((path / "variables").glob("variables.data-*"))
    if not variables:
        raise ModelError(f"{path}: a SavedModel without variables")
    return sha256_files(variables)


def export_metadata(saved_model_dir: Path) -> dict:
    """An export's ``assets.extra/fer_keras.json``, ``{}`` when it has none. A damaged one is a ModelError naming
    it: read as ``{}``, the export's built-in TTA would pass for none, and the tools would add theirs on top."""
    meta = saved_model_dir / METADATA_FILE
    if not meta.is_file():
        return {}
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelError(f"{meta}: damaged export metadata ({e}); export the model again") from None
    if not isinstance(info, dict):
        raise ModelError(f"{meta}: damaged export metadata (not a JSON object); export the model again")
    return info


def served_views(kind: str, path: Path) -> tuple[str, int]:
    """The test-time augmentation a model is served with and its crop size: an export's built-in ones (recorded in
    its metadata), ``("none", 40)`` for a ``.keras`` model."""
    return metadata_views(export_metadata(path) if kind == "saved_model" else {})


def metadata_views(meta: dict) -> tuple[str, int]:
    """:func:`served_views` from an export's metadata already read (``{}``: none built in)."""
    from fer_keras.tta import DEFAULT_CROP_SIZE

    return meta.get("tta") or "none", int(meta.get("crop_size") or DEFAULT_CROP_SIZE)


class Predictor:
    """Logits for pixel batches ``[N, 48, 48, 1]`` (0-255), from a Keras model or an export."""

    def __init__(self, kind: str, path: Path, keras_model: keras.Model | None = None,
                 signature: Callable[..., dict] | None = None, metadata: dict | None = None):
        self.kind = kind
        self.path = path
        self.keras_model = keras_model
        self.signature = signature
        self.metadata = metadata or {}

    @property
    def built_in_tta(self) -> str:
        """The views the model averages itself: an export's built-in TTA when it runs as served, ``none`` for a
        Keras model and for an export's network alone."""
        return "none" if self.kind != "saved_model" or self.network_only else self.metadata.get("tta") or "none"

    @property
    def network_only(self) -> bool:
        """An export run as the Keras network it holds, without the views built around it."""
        return self.kind == "saved_model" and self.keras_model is not None

    def outputs(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities); an export's probabilities include the TTA it was built with."""
        import tensorflow as tf

        logits, probs = [], []
        for start in range(0, len(images), batch_size):
            x = tf.convert_to_tensor(np.asarray(images[start:start + batch_size], np.float32))
            if self.keras_model is not None:
                z = np.asarray(self.keras_model(x, training=False), np.float32)
                e = np.exp(z - z.max(axis=1, keepdims=True))
                logits.append(z)
                probs.append(e / e.sum(axis=1, keepdims=True))
            else:
                out = self.signature(pixels=x)
                logits.append(out["logits"].numpy())
                probs.append(out["probabilities"].numpy())
        if not logits:
            empty = np.zeros((0, 7), np.float32)
            return empty, empty
        return np.concatenate(logits), np.concatenate(probs)

    @property
    def input_crop(self) -> int:
        """The central window the model sees (0: the whole image); ten-crop shows it windows of this size."""
        if self.keras_model is not None:
            from fer_keras.model import input_crop_of

            return input_crop_of(self.keras_model)
        return int(self.metadata.get("input_crop", 0))

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return self.outputs(images, batch_size)[0]

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return self.outputs(images, batch_size)[1]


def load_predictor(path: str | os.PathLike | None = None, network_only: bool = False) -> Predictor:
    """The model at ``path`` (resolved as ``--model`` is). ``network_only``: an export is rebuilt as its network
    alone (:func:`load_keras`), so the caller chooses its test-time views, as for a Keras model; its metadata
    still records the views it serves with."""
    kind, p = resolve(path)
    if kind == "keras":
        from fer_keras.model import as_float32, load_keras_model

        return Predictor(kind, p, keras_model=as_float32(load_keras_model(str(p))))
    if network_only:
        return Predictor(kind, p, keras_model=load_keras(p), metadata=export_metadata(p))
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(p))
        signature = loaded.signatures["serving_default"]
    except (*_LOAD_ERRORS, tf.errors.OpError) as e:
        raise ModelError(f"{p}: cannot load SavedModel ({str(e).splitlines()[0][:200]})") from None
    _check_signature(p, signature)
    from fer_keras.tta import NO_TTA_SIGNATURE, UNKNOWN_TTA

    metadata = export_metadata(p)
    if "tta" not in metadata and NO_TTA_SIGNATURE in loaded.signatures:  # its views are built in, but which?
        metadata["tta"] = UNKNOWN_TTA
    predictor = Predictor(kind, p, signature=signature, metadata=metadata)
    predictor._loaded = loaded  # keep the object (and its variables) alive
    return predictor


class Ensemble:
    """Several predictors whose probabilities are averaged with equal weight.

    Test-time augmentation applies to each member on its own (:func:`fer_keras.tta.tta_probabilities`), so a
    member trained on crops sees crops of its size and an export averages the views built into it.
    """

    kind = "ensemble"

    def __init__(self, members: list[Predictor]):
        if len(members) < 2:
            raise ModelError(f"an ensemble needs at least 2 models, got {len(members)}")
        self.members = list(members)

    @property
    def path(self) -> str:
        return " + ".join(str(m.path) for m in self.members)

    @property
    def input_crop(self) -> int:
        """The members' common central window; 0 when they differ (each member keeps its own)."""
        crops = {m.input_crop for m in self.members}
        return crops.pop() if len(crops) == 1 else 0

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return np.mean([m.probabilities(images, batch_size) for m in self.members], axis=0)


def resolve_all(paths: list[str | os.PathLike | None]) -> list[tuple[str, Path]]:
    """:func:`resolve` of each path; one model named twice (in any spelling) is refused, since in an ensemble it
    would silently count double."""
    resolved = [resolve(p) for p in paths]
    seen: dict[Path, str] = {}
    for (_, p), given in zip(resolved, paths):
        key = p.resolve()
        if key in seen:
            raise ModelError(f"{given or p}: the same model as {seen[key]}; name each model of an ensemble once")
        seen[key] = str(given or p)
    return resolved


def load_ensemble(paths: list[str | os.PathLike | None], network_only: bool = False) -> Ensemble:
    """An :class:`Ensemble` of the models at ``paths``, each resolved as ``--model`` is (``network_only``: as in
    :func:`load_predictor`)."""
    return Ensemble([load_predictor(p, network_only) for _, p in resolve_all(paths)])


def _check_signature(path: Path, signature: Callable[..., dict]) -> None:
    """Refuses a SavedModel whose ``serving_default`` is not fer_keras': ``pixels [N, 48, 48, 1]`` in, ``logits`` and
    ``probabilities [N, 7]`` out (a Keras ``model.export()`` names its input otherwise)."""
    from fer_keras import IMAGE_SIZE, NUM_CLASSES

    inputs = signature.structured_input_signature[1]
    pixels = inputs.get("pixels")
    if pixels is None or list(pixels.shape)[1:] != [IMAGE_SIZE, IMAGE_SIZE, 1]:
        found = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items()) or "none"
        raise ModelError(f"{path}: serving_default takes {found}, not pixels [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1]; "
                         "is it a fer_keras export?")
    outputs = signature.structured_outputs
    for name in ("logits", "probabilities"):
        if name not in outputs or list(outputs[name].shape)[1:] != [NUM_CLASSES]:
            raise ModelError(f"{path}: serving_default has no {name} output of shape [N, {NUM_CLASSES}]; is it a "
                             "fer_keras export?")


def load_keras(path: str | os.PathLike | None = None) -> keras.Model:
    """A float32 Keras model for gradient-based tools; exports are rebuilt from their stored config. The
    best.keras of a mixed-precision run is rebuilt in float32, as the export serves it (and tf-keras-vis cannot
    mix its float32 scores with bfloat16 gradients)."""
    kind, p = resolve(path)
    from fer_keras.model import as_float32, load_keras_model, resnet18

    if kind == "keras":
        return as_float32(load_keras_model(str(p)))
    import keras

    model_json = p / "assets.extra" / "keras_model.json"
    config = export_metadata(p).get("train_config")
    import tensorflow as tf

    try:
        if model_json.is_file():
            model = keras.models.model_from_json(model_json.read_text())
        elif config:
            model = resnet18(config["stem"], int(config["input_channels"]),
                             dropout=float(config.get("dropout", 0.0)), input_crop=int(config.get("input_crop", 0)))
        else:
            raise ModelError(f"{p}: this export holds no fer_keras model description; pass a .keras model instead")
        loaded = tf.saved_model.load(str(p))
    except (*_LOAD_ERRORS, tf.errors.OpError) as e:
        raise ModelError(f"{p}: cannot rebuild the Keras model ({str(e).splitlines()[0][:200]})") from None
    exported = list(getattr(loaded, "variables", []))
    if len(exported) != len(model.variables):
        raise ModelError(f"{p}: holds {len(exported)} variables, the rebuilt model {len(model.variables)}")
    for target, source in zip(model.variables, exported):
        if tuple(target.shape) != tuple(source.shape):
            raise ModelError(f"{p}: variable {source.name} has shape {source.shape}, expected {target.shape}")
        target.assign(source.numpy())
    return model
