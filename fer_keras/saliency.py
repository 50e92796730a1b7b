"""Where the model looks: vanilla saliency, SmoothGrad and Grad-CAM++ maps per image (tf-keras-vis).

``python -m fer_keras.saliency`` explains images picked by index from a split (``--indices``), image
files (``--images``), or by default the first image of each class in the split. For each image it
writes a PNG with the input, the two gradient maps and a Grad-CAM++ overlay; plus one grid PNG of
all images and ``saliency.json`` with labels, probabilities and figure paths.

The library functions take a model and arrays and return arrays, so notebooks and tests can use
them without files; plotting lives in separate functions. The score is the logit of a chosen class
(the predicted one by default): logits rather than softmax probabilities, because a probability's
gradient also pushes the other classes down and saturates for confident predictions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from absl import flags

from fer_keras import CLASS_NAMES, LAST_CONV_LAYER, NUM_CLASSES, cli
from fer_keras import data as fer_data
from fer_keras.errors import ConfigError, ModelError
from fer_keras.history import atomic_write_text, check_json_replaceable, check_npz_replaceable
from fer_keras.tta import DEFAULT_CROP_SIZE
from fer_keras.vis import (
    as_batch,
    check_layer,
    new_figure,
    numpy_seeded,
    parse_int_list,
    quiet_keras,
    save_figure,
    split_indices,
)

TARGETS = ("pred", "true")
DEFAULT_OUTPUT_DIR = "reports/saliency"
DEFAULT_SMOOTH_SAMPLES = 20
DEFAULT_SMOOTH_NOISE = 0.2
BATCH_SIZE = 32
# Keys every saliency.json has: an existing one is replaced only if it has them.
REPORT_KEYS = ("grid", "images")
MAPS_FILE = "maps.npz"
MAPS_KEYS = ("ids", "targets", "saliency", "smoothgrad", "gradcam_plus_plus")

if TYPE_CHECKING:  # Keras, TensorFlow and tf-keras-vis are imported where used: a bad flag is answered without them
    import keras
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# --------------------------------------------------------------------------------------------
# Model and input plumbing


def linearize(model: keras.Model) -> keras.Model:
    """The model with a final softmax (layer or activation, :func:`model.as_logits`) or any other output
    activation removed, via ReplaceToLinear.

    Models that already output logits are returned as they are; others are cloned first so the
    caller's model keeps its softmax. Gradients of probabilities saturate, those of logits do not.
    """
    import keras
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    from fer_keras.model import as_logits, output_layer

    model = as_logits(model)
    linear = keras.activations.linear
    if getattr(output_layer(model), "activation", linear) is linear:
        return model
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    if getattr(clone, "output_names", None):
        ReplaceToLinear()(clone)
    else:
        clone.layers[-1].activation = linear
    return clone


def _class_list(classes: Sequence[int] | np.ndarray, n: int, num_outputs: int) -> list[int]:
    out = [int(c) for c in np.asarray(classes).reshape(-1)]
    if len(out) != n:
        raise ConfigError(f"got {len(out)} target classes for {n} images")
    bad = [c for c in out if not 0 <= c < num_outputs]
    if bad:
        raise ConfigError(f"target class {bad[0]} is outside 0-{num_outputs - 1}")
    return out


def _chunks(n: int, size: int = BATCH_SIZE) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Outputs ``[N, classes]`` of a model that ends in logits (:func:`linearize`), a batch at a time."""
    return np.concatenate([np.asarray(model(as_batch(images[s]), training=False), np.float32)
                           for s in _chunks(len(images))])


# --------------------------------------------------------------------------------------------
# Maps


def vanilla_saliency(model: keras.Model, images: np.ndarray, classes: Sequence[int],
                     normalize: bool = True) -> np.ndarray:
    """|d logit[class] / d pixel| per image, ``[N, H, W]`` (max over channels; per image 0-1 if
    ``normalize``). Pixels the model ignores get exactly 0."""
    return smoothgrad(model, images, classes, samples=0, normalize=normalize)


def smoothgrad(model: keras.Model, images: np.ndarray, classes: Sequence[int],
               samples: int = DEFAULT_SMOOTH_SAMPLES, noise: float = DEFAULT_SMOOTH_NOISE,
               normalize: bool = True, seed: int | None = None) -> np.ndarray:
    """Saliency averaged over ``samples`` noisy copies (noise std = ``noise`` x the image's value
    range), ``[N, H, W]``: removes the speckle of single gradients. ``samples=0`` is vanilla.

    The noise comes from numpy's global generator (tf-keras-vis' choice); a ``seed`` makes the maps reproducible
    and leaves that generator's state as it was."""
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.scores import CategoricalScore

    x = as_batch(images)
    model = linearize(model)
    targets = _class_list(classes, int(x.shape[0]), int(model.outputs[0].shape[-1]))
    saliency = Saliency(model, clone=False)
    out = []
    with quiet_keras(), numpy_seeded(seed):
        for s in _chunks(int(x.shape[0])):
            out.append(np.asarray(saliency(CategoricalScore(targets[s]), x[s], smooth_samples=samples,
                                           smooth_noise=noise, normalize_map=normalize)))
    return np.concatenate(out).reshape(x.shape[:3]) if out else np.zeros(x.shape[:3], np.float32)


def gradcam_plus_plus(model: keras.Model, images: np.ndarray, classes: Sequence[int],
                      layer: str = LAST_CONV_LAYER, normalize: bool = True) -> np.ndarray:
    """Grad-CAM++ on ``layer``'s feature maps, resized to the input, ``[N, H, W]``: float32 in 0-1 with
    ``normalize``, else float64 (the raw maps carry a factor exp(logit)).

    The layer is passed by name because tf-keras-vis only finds top-level Conv layers by itself,
    and ResNet stages are custom BasicBlock layers. The maps are resized here (:func:`place_cam`), not by tf-keras-vis,
    whose corner-aligned zoom moves each cell's value outwards onto the image's edge.
    """
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus

    from fer_keras.model import input_crop_of

    x = as_batch(images)
    model = linearize(model)
    check_layer(model, layer)
    targets = _class_list(classes, int(x.shape[0]), int(model.outputs[0].shape[-1]))
    cam = GradcamPlusPlus(model, clone=False)
    centered_score = _centered_score_class()
    crop = input_crop_of(model)
    out = []
    with quiet_keras():
        for s in _chunks(int(x.shape[0])):
            cells = np.asarray(cam(centered_score(targets[s]), x[s], penultimate_layer=layer,
                                   seek_penultimate_conv_layer=False, normalize_cam=normalize, expand_cam=False))
            maps = place_cam(cells, int(x.shape[1]), crop)
            if not normalize:  # the factor exp(score) that the centred score left out, in float64
                logits = _logits(model, x[s])
                maps = maps * np.exp(logits[np.arange(len(targets[s])), targets[s]].astype(np.float64))[:, None, None]
            out.append(maps)
    return np.concatenate(out).reshape(x.shape[:3]) if out else np.zeros(x.shape[:3], np.float32 if normalize
                                                                        else np.float64)


@functools.cache
def _centered_score_class() -> type:
    """tf-keras-vis' CategoricalScore for the class logit minus its own value held constant: the same gradients, and
    a score of 0.

    Grad-CAM++ (tf-keras-vis) multiplies the gradients by exp(score) in float32, which overflows to inf above a
    logit of ~88 (NaN maps) and underflows to 0 below ~-103 (empty maps). The factor is the same for every
    feature map of an image, so it cancels in the per-image normalised map; a score of exactly 0 makes it 1.
    """
    import tensorflow as tf
    from tf_keras_vis.utils.scores import CategoricalScore

    class CenteredScore(CategoricalScore):
        def __call__(self, output):
            score = super().__call__(output)
            return score - tf.stop_gradient(score)

    return CenteredScore


def place_cam(cells: np.ndarray, size: int, crop: int = 0) -> np.ndarray:
    """Class activation maps ``[N, h, w]`` laid over ``size``-pixel images, ``[N, size, size]``.

    Bilinear with half-pixel centres, as the network's strided layers tile the input: each cell's value sits at the
    centre of the block of pixels it covers, and edge blocks keep their cell's value (a 2x2 map lights a quarter of
    the image, not a ramp from one corner). A model with ``input_crop`` sees only the central ``crop`` pixels; its
    map covers that window and the border it never sees is 0.
    """
    import tensorflow as tf

    window = crop or size
    resized = tf.image.resize(tf.constant(np.asarray(cells, np.float32)[..., None]), (window, window),
                              method="bilinear").numpy()[..., 0]
    offset = (size - window) // 2
    pad = ((0, 0), (offset, size - window - offset), (offset, size - window - offset))
    return np.pad(resized, pad).astype(np.float32)


def served_probabilities(model: keras.Model, images: np.ndarray, tta: str = "none",
                         crop_size: int = DEFAULT_CROP_SIZE) -> np.ndarray:
    """Probabilities ``[N, classes]`` as served: averaged over the views of ``tta`` with ten-crop's ``crop_size``
    (see :mod:`fer_keras.tta`; ``none`` is the image alone)."""
    from fer_keras.inference import Predictor
    from fer_keras.model import as_logits
    from fer_keras.tta import tta_probabilities

    return tta_probabilities(Predictor("keras", Path(model.name), keras_model=as_logits(model)), images, tta,
                             crop_size)


def target_classes(target: str, labels: np.ndarray, predictions: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    """The class each map explains: the prediction, or the true label (needs labels)."""
    if target == "pred":
        return np.asarray(predictions, np.int64)
    if target == "true":
        labels = np.asarray(labels, np.int64)
        missing = np.flatnonzero(labels < 0)
        if missing.size:
            raise ConfigError(f"--target=true but image {ids[missing[0]]} has no label; use --target=pred")
        return labels
    raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


# --------------------------------------------------------------------------------------------
# Choosing images


@dataclasses.dataclass
class Selection:
    """Images to explain with what is known about them (label -1 = unknown)."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    sources: list[str]
    indices: list[int | None]
    split_label: str | None = None  # the split the indices are into, named in the figures (val (PublicTest))


def one_per_class(split: fer_data.Split) -> list[int]:
    """The first image of each class present, in class order; the first images if unlabeled."""
    if not split.labeled:
        return list(range(min(NUM_CLASSES, len(split))))
    return [int(np.flatnonzero(split.labels == c)[0]) for c in range(NUM_CLASSES) if (split.labels == c).any()]


def from_split(data_path: str | None, split_name: str, indices: Sequence[int] | None,
               skip_bad_rows: bool = False) -> Selection:
    """Images by index (or one per class) from a split of any layout ``fer_keras.data`` reads."""
    data = fer_data.load(data_path, skip_bad_rows=skip_bad_rows)
    split = data.split(split_name)
    chosen = split_indices(split, indices, data.source, split_name) if indices else one_per_class(split)
    return Selection(
        images=split.images[chosen],
        labels=split.labels[chosen],
        ids=[str(split.ids[i]) for i in chosen],
        sources=[f"{data.source}:{fer_data.canonical_split(split_name)}[{i}]" for i in chosen],
        indices=list(chosen),
        split_label=fer_data.split_label(split_name),
    )


def from_files(paths: Sequence[str]) -> Selection:
    """Image files; a parent folder named after a class (``happy/x.png``) gives the true label."""
    images, labels, converted = [], [], 0
    for p in paths:
        array, conv = fer_data.read_image(p)
        images.append(array)
        converted += conv
        parent = Path(p).parent.name.lower()
        labels.append(CLASS_NAMES.index(parent) if parent in CLASS_NAMES else -1)
    fer_data.warn_converted(paths[0] if len(paths) == 1 else "--images", converted)
    return Selection(np.stack(images), np.asarray(labels, np.int64), [Path(p).name for p in paths],
                     [str(p) for p in paths], [None] * len(paths))


# --------------------------------------------------------------------------------------------
# Figures


def class_name(c: int) -> str:
    return CLASS_NAMES[c] if 0 <= c < len(CLASS_NAMES) else "?"


def _slug(text: str) -> str:
    """A file-name part from an image id such as ``happy/Training_1.jpg``."""
    if Path(text).suffix.lower() in fer_data.IMAGE_SUFFIXES:
        text = text[: -len(Path(text).suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "image"


def _caption(label: int, pred: int, prob: float, tta: str = "none", alone: int | None = None) -> str:
    """The true and predicted class; with served TTA the prediction averages views the maps do not explain, so it
    says so, and names the network's own class on the image shown when that differs."""
    served = "" if tta == "none" else f", {tta} as served"
    own = f"; the image alone: {class_name(alone)}" if alone is not None and alone != pred else ""
    return f"true: {class_name(label) if label >= 0 else 'unknown'}, pred: {class_name(pred)} ({prob:.0%}{served}{own})"


# What each panel's colours measure; every map is scaled to 0-1 per image (tf-keras-vis' normalisation).
COLORBAR_LABELS = ("pixel value (0-255)", "|d score / d pixel|, 0-1 per image",
                   "mean |d score / d pixel|, 0-1 per image", "Grad-CAM++ map, 0-1 per image")


def _panels(axes: Sequence[Axes], fig: Figure, image: np.ndarray, saliency: np.ndarray,
            smooth: np.ndarray, cam: np.ndarray, colorbars: bool) -> None:
    gray = np.asarray(image, np.float32).reshape(image.shape[0], image.shape[1])
    shown = [
        axes[0].imshow(gray, cmap="gray", vmin=0, vmax=255),
        axes[1].imshow(saliency, cmap="inferno"),
        axes[2].imshow(smooth, cmap="inferno"),
    ]
    axes[3].imshow(gray, cmap="gray", vmin=0, vmax=255)
    shown.append(axes[3].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=max(float(np.max(cam)), 1e-6)))
    for ax, im, label in zip(axes, shown, COLORBAR_LABELS):
        ax.set_xticks([])
        ax.set_yticks([])
        if colorbars:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(label, fontsize=7)


def plot_explanation(path: str | Path, image: np.ndarray, saliency: np.ndarray, smooth: np.ndarray,
                     cam: np.ndarray, label: int, pred: int, prob: float, target: int,
                     title: str = "", layer: str = LAST_CONV_LAYER, smooth_samples: int = 0, tta: str = "none",
                     alone: int | None = None) -> Path:
    """One image's figure: input, saliency, SmoothGrad and Grad-CAM++ overlay with colour bars."""
    fig = new_figure(13, 3.6)
    axes = fig.subplots(1, 4)
    _panels(axes, fig, image, saliency, smooth, cam, colorbars=True)
    axes[0].set_title(f"input\ntrue: {class_name(label) if label >= 0 else 'unknown'}", fontsize=9)
    axes[1].set_title(f"saliency\nscore: {class_name(target)} logit", fontsize=9)
    axes[2].set_title(f"SmoothGrad ({smooth_samples} samples)\npred: {class_name(pred)} ({prob:.0%})", fontsize=9)
    axes[3].set_title(f"Grad-CAM++ on {layer}\nscore: {class_name(target)}", fontsize=9)
    fig.suptitle(f"{title}  -  {_caption(label, pred, prob, tta, alone)}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_grid(path: str | Path, images: np.ndarray, saliency: np.ndarray, smooth: np.ndarray,
              cam: np.ndarray, labels: Sequence[int], preds: Sequence[int], probs: Sequence[float],
              titles: Sequence[str], tta: str = "none", alone: Sequence[int] | None = None) -> Path:
    """All images in one figure, one row each, so models or images can be compared at a glance."""
    n = len(images)
    fig = new_figure(9, 2.3 * max(n, 1))
    axes = fig.subplots(max(n, 1), 4, squeeze=False)
    for i in range(n):
        _panels(axes[i], fig, images[i], saliency[i], smooth[i], cam[i], colorbars=False)
        own = None if alone is None else int(alone[i])
        axes[i][0].set_ylabel(f"{titles[i]}\n{_caption(int(labels[i]), int(preds[i]), float(probs[i]), tta, own)}",
                              fontsize=7)
    for ax, name in zip(axes[0], ("input", "saliency", "SmoothGrad", "Grad-CAM++")):
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


# --------------------------------------------------------------------------------------------
# Entrypoint


def check_outputs(out: Path) -> dict | None:
    """Refuses a ``saliency.json`` or ``maps.npz`` in ``out`` that an earlier run did not write; returns that earlier
    report (None if there is none)."""
    earlier = check_json_replaceable(out / "saliency.json", REPORT_KEYS, "a saliency report")
    check_npz_replaceable(out / MAPS_FILE, MAPS_KEYS, "saliency maps")
    return earlier


def explain(model: keras.Model, selection: Selection, output_dir: str | Path, target: str = "pred",
            layer: str = LAST_CONV_LAYER, smooth_samples: int = DEFAULT_SMOOTH_SAMPLES,
            smooth_noise: float = DEFAULT_SMOOTH_NOISE, metadata: dict | None = None, tta: str = "none",
            crop_size: int = DEFAULT_CROP_SIZE, seed: int | None = None) -> dict:
    """Computes all maps for a selection, writes the figures, the maps themselves (``maps.npz``: the normalised
    ``saliency``, ``smoothgrad`` and ``gradcam_plus_plus`` maps ``[N, H, W]``, with the ``ids`` and the ``targets``
    they explain) and the JSON (with ``metadata`` such as the model and data paths first); returns the JSON dict.

    ``tta`` is the test-time augmentation the model is served with (an export's built-in one, with ten-crop's
    ``crop_size``: :func:`fer_keras.inference.served_views`): predictions and probabilities then average its views,
    as users get them; the maps explain the image itself. ``seed`` seeds SmoothGrad's noise (:func:`smoothgrad`).
    """
    expected = tuple(model.inputs[0].shape[1:])
    if tuple(selection.images.shape[1:]) != expected:
        raise ModelError(f"model {model.name!r} takes images of shape {expected}, got {selection.images.shape[1:]}")
    check_layer(model, layer)
    out = Path(output_dir)
    earlier = check_outputs(out)
    probs = served_probabilities(model, selection.images, tta, crop_size)
    model = linearize(model)  # once here, not a clone per map
    preds = probs.argmax(axis=1)
    # The class of the network alone on the image the maps explain: the served TTA's may differ.
    alone = preds if tta == "none" else served_probabilities(model, selection.images).argmax(axis=1)
    classes = target_classes(target, selection.labels, preds, selection.ids)
    saliency = vanilla_saliency(model, selection.images, classes)
    smooth = smoothgrad(model, selection.images, classes, smooth_samples, smooth_noise, seed=seed)
    cam = gradcam_plus_plus(model, selection.images, classes, layer)

    out.mkdir(parents=True, exist_ok=True)
    records = []
    titles = []
    where = f"{selection.split_label} " if selection.split_label else ""
    for k in range(len(selection.images)):
        label, pred = int(selection.labels[k]), int(preds[k])
        title = (selection.ids[k] if selection.indices[k] is None
                 else f"{where}#{selection.indices[k]} (id {selection.ids[k]})")
        titles.append(title)
        figure = plot_explanation(out / f"{k:03d}_{_slug(selection.ids[k])}.png", selection.images[k],
                                  saliency[k], smooth[k], cam[k], label, pred, float(probs[k, pred]),
                                  int(classes[k]), title, layer, smooth_samples, tta, int(alone[k]))
        records.append({
            "source": selection.sources[k],
            "index": selection.indices[k],
            "id": selection.ids[k],
            "true": label if label >= 0 else None,
            "true_label": class_name(label) if label >= 0 else None,
            "pred": pred,
            "pred_label": class_name(pred),
            "image_alone_pred_label": class_name(int(alone[k])),  # the network on the explained image, no TTA
            "target": int(classes[k]),
            "target_label": class_name(int(classes[k])),
            "probabilities": {class_name(c): round(float(p), 6) for c, p in enumerate(probs[k])},
            "figure": str(figure),
        })
    grid = plot_grid(out / "grid.png", selection.images, saliency, smooth, cam, selection.labels, preds,
                     probs[np.arange(len(preds)), preds], titles, tta, alone)
    maps = write_maps(out / MAPS_FILE, ids=np.asarray(selection.ids, str), targets=np.asarray(classes, np.int64),
                      saliency=saliency, smoothgrad=smooth, gradcam_plus_plus=cam)
    report = {
        **(metadata or {}),
        "target": target,
        "layer": layer,
        "smooth_samples": smooth_samples,
        "smooth_noise": smooth_noise,
        "smooth_seed": seed,
        "prediction_tta": tta,
        "grid": str(grid),
        "maps": str(maps),
        "images": records,
    }
    stale = _earlier_figures(earlier) - {Path(r["figure"]).name for r in records}
    atomic_write_text(out / "saliency.json", json.dumps(report, indent=2) + "\n")
    for name in stale:  # an earlier run's figures of other images, which the new saliency.json does not list
        (out / name).unlink(missing_ok=True)
    return report


def write_maps(path: Path, **arrays: np.ndarray) -> Path:
    """The arrays as an ``.npz``, written atomically (a kill leaves the earlier file)."""
    import io

    from fer_keras.predict import atomic_write

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write(path, buffer.getvalue())


def _earlier_figures(earlier: dict | None) -> set[str]:
    """Names of the per-image figures an earlier saliency.json (already checked to be ours) lists."""
    try:
        names = {Path(r["figure"]).name for r in (earlier or {}).get("images", [])}
    except (KeyError, TypeError):
        return set()
    return {n for n in names if re.fullmatch(r"\d{3}_.*\.png", n)}


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A .keras file, training run directory or SavedModel export; "
                        "default: the shipped model.")
    flags.DEFINE_string("data", None, "FER2013 in any layout fer_keras.data reads; default: the bundled sample.")
    cli.define_skip_bad_rows()
    flags.DEFINE_string("split", "val", "Split to pick images from: train, val (PublicTest) or test (PrivateTest).")
    flags.DEFINE_list("indices", None, "Image indices in the split, e.g. 0,5,10-12; default: one image per class.")
    flags.DEFINE_list("images", None, "Image files instead of split indices, e.g. a.jpg,happy/b.png "
                      "(a parent folder named after a class gives the true label).")
    flags.DEFINE_enum("target", "pred", TARGETS, "Class whose logit is explained: predicted or true.")
    flags.DEFINE_string("layer", LAST_CONV_LAYER, "Layer with feature maps for Grad-CAM++.")
    flags.DEFINE_integer("smooth_samples", DEFAULT_SMOOTH_SAMPLES, "Noisy copies averaged by SmoothGrad.")
    flags.DEFINE_float("smooth_noise", DEFAULT_SMOOTH_NOISE,
                       "SmoothGrad noise std as a fraction of the image's value range.")
    flags.DEFINE_string("output_dir", DEFAULT_OUTPUT_DIR, "Folder for the PNGs and saliency.json.")
    cli.define_seed(0, "Random seed (SmoothGrad noise).")
    flags.register_validator("smooth_samples", lambda v: v >= 1, "--smooth_samples must be >= 1")
    flags.register_validator("smooth_noise", lambda v: 0 < v <= 1, "--smooth_noise must be in (0, 1], a fraction of "
                             "the value range (0.2 is 20 %)")
    flags.register_validator("images", lambda v: v is None or all(s.strip() for s in v),
                             "--images has an empty entry (a stray comma?)")
    flags.register_validator("output_dir", lambda v: bool(v and v.strip()), "--output_dir must not be empty")
    flags.register_validator("split", lambda v: v.strip().lower() in fer_data.SPLIT_ALIASES,
                             "--split must be train, val (PublicTest) or test (PrivateTest)")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    if f.indices and f.images:
        raise ConfigError("give either --indices or --images, not both")
    ignored = [f"--{name}" for name in ("data", "split") if f.images and f[name].present]
    if ignored:  # they would be ignored without a word, as filters refuses --image with --image_index
        raise ConfigError(f"--images names its image files itself; {' and '.join(ignored)} choose split images "
                          "(with --indices)")
    if f.images:
        selection = from_files(f.images)
        metadata = {}
    else:
        selection = from_split(f.data, f.split, parse_int_list(f.indices, "--indices") if f.indices else None,
                               f.skip_bad_rows)
        metadata = {"data": f.data or str(fer_data.SAMPLE_PATH), "split": fer_data.canonical_split(f.split)}
    from fer_keras.inference import load_keras, resolve, served_views

    tta, crop_size = served_views(*resolve(f.model))
    model = load_keras(f.model)
    metadata = {"model": str(Path(f.model).resolve()) if f.model else "shipped model", **metadata}
    report = explain(model, selection, f.output_dir, f.target, f.layer, f.smooth_samples, f.smooth_noise,
                     metadata, tta, crop_size, f.seed)
    served = "" if tta == "none" else f", {tta} TTA as served"
    for r in report["images"]:
        print(f"{r['id']}: true {r['true_label'] or 'unknown'}, pred {r['pred_label']} "
              f"({r['probabilities'][r['pred_label']]:.0%}{served}) -> {r['figure']}")
    print(f"wrote {len(report['images'])} figure(s), {report['grid']}, {report['maps']} and "
          f"{Path(f.output_dir) / 'saliency.json'}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
