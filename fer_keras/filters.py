"""What filters respond to: activation maximisation, feature maps and top-activating images.

``python -m fer_keras.filters`` looks at chosen filters (channels) of chosen layers, by default the
first 16 of the stem after its BatchNorm and ReLU (``stem_relu``: the convolution ``stem_conv``
itself is linear, so its mean activation follows the image's mean brightness and maximising it draws
a flat bright or dark image) and of the last residual stage (``stage4_block2``), and writes per layer:

* ``<layer>_maximization.png``: inputs optimised by tf-keras-vis ``ActivationMaximization`` to
  maximise each filter's mean activation;
* ``<layer>_feature_maps.png``: the filters' feature maps for one image;
* ``<layer>_top<k>.png``: the k images of a split that activate each filter most;

plus ``filters.json`` with the filter indices, activations reached, outcomes and top-k image ids.

The model takes raw 0-255 pixels, so the optimisation runs in pixel space: seeds are uniform 0-255
and a clipping input modifier keeps every step in range (tf-keras-vis itself only clips the result).
The score is divided by the filter's activation spread on random images, so one learning rate and
one set of regulariser weights suit both a stem and a deep ReLU stage. A ReLU filter that noise never
switches on gets no gradient from noise; it starts from the split image activating it most instead,
and one that is constant there too is reported dead (such as a filter whose weights are all zero).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from absl import flags, logging
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fer_keras import CLASS_NAMES, LAST_CONV_LAYER, STEM_OUTPUT_LAYER, cli
from fer_keras import data as fer_data
from fer_keras.errors import ConfigError
from fer_keras.history import atomic_write_text, check_json_replaceable
from fer_keras.vis import (
    as_batch,
    check_layer,
    new_figure,
    parse_int_list,
    png_bytes,
    quiet_keras,
    split_indices,
)

PIXEL_RANGE = (0.0, 255.0)
# Keys every filters.json has: an existing one is replaced only if it has them.
REPORT_KEYS = ("layers", "feature_map_image")
DEFAULT_FILTERS = 16
DEFAULT_LAYERS = (STEM_OUTPUT_LAYER, LAST_CONV_LAYER)
DEFAULT_STEPS = 128
DEFAULT_LEARNING_RATE = 8.0
# Per unit of score (activation / random-input spread) and of 0-255 pixel: small, because the best
# patterns of early filters are edges and gratings that a strong smoothness prior would erase.
DEFAULT_TV_WEIGHT = 0.001
DEFAULT_NORM_WEIGHT = 0.0005
RANDOM_PROBES = 32
SCAN_BATCH = 128

if TYPE_CHECKING:
    import keras
    import tensorflow as tf
    from tf_keras_vis.activation_maximization.callbacks import Callback


# --------------------------------------------------------------------------------------------
# Activations


def filter_model(model: keras.Model, layer: str) -> keras.Model:
    """A model from the input to ``layer``'s feature maps; shares weights with ``model``."""
    import keras

    found = check_layer(model, layer)
    return keras.Model(model.inputs, found.output, name=f"{model.name}_{layer}")


def check_filters(sub: keras.Model, layer: str, filters: Sequence[int]) -> list[int]:
    """The filter indices as ints, or a one-line error naming the layer and its filter count."""
    channels = int(sub.outputs[0].shape[-1])
    for f in filters:
        if not 0 <= f < channels:
            raise ConfigError(
                f"filter {f} is out of range of layer {layer!r}, which has {channels} filters (0-{channels - 1})"
            )
    return [int(f) for f in filters]


def channel_means(sub: keras.Model, images: np.ndarray, filters: Sequence[int],
                  batch_size: int = SCAN_BATCH) -> np.ndarray:
    """Mean activation over positions of each filter, ``[N, len(filters)]``."""
    index = np.asarray(filters, np.int64)
    out = []
    with quiet_keras():
        for start in range(0, len(images), batch_size):
            maps = np.asarray(sub(as_batch(images[start:start + batch_size]), training=False), np.float32)
            out.append(maps.mean(axis=(1, 2))[:, index])
    return np.concatenate(out) if out else np.zeros((0, len(index)), np.float32)


def feature_maps(model: keras.Model, layer: str, image: np.ndarray, filters: Sequence[int]) -> np.ndarray:
    """The filters' feature maps for one image, ``[len(filters), h, w]``."""
    sub = filter_model(model, layer)
    filters = check_filters(sub, layer, filters)
    with quiet_keras():
        maps = np.asarray(sub(as_batch(np.asarray(image)[None]), training=False), np.float32)[0]
    return np.moveaxis(maps[..., filters], -1, 0)


def top_k_images(model: keras.Model, layer: str, images: np.ndarray, filters: Sequence[int],
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, mean activations) ``[len(filters), k]`` of the images activating each filter most,
    strongest first; ties keep the earlier image."""
    sub = filter_model(model, layer)
    filters = check_filters(sub, layer, filters)
    means = channel_means(sub, images, filters)  # [N, F]
    k = min(int(k), len(images))
    order = np.argsort(-means, axis=0, kind="stable")[:k].T  # [F, k]
    return order, np.take_along_axis(means.T, order, axis=1)


# --------------------------------------------------------------------------------------------
# Activation maximisation


@functools.cache
def _tf_keras_vis_classes() -> dict[str, type]:
    """``FilterScore``, ``StderrProgress``, ``RmsNorm`` and ``SeededJitter``, defined on first use: they subclass
    tf-keras-vis classes, whose import loads TensorFlow, which a tool answering a bad flag should not wait for."""
    import tensorflow as tf
    from tf_keras_vis.activation_maximization.callbacks import Callback
    from tf_keras_vis.activation_maximization.input_modifiers import Jitter
    from tf_keras_vis.activation_maximization.regularizers import Regularizer
    from tf_keras_vis.utils.scores import Score

    class FilterScore(Score):
        """Mean activation of filter ``filters[i]`` for batch element i, divided by ``scale[i]``.

        Like ``CategoricalScore`` but averaged over positions and scaled, so that a batch optimises
        several filters at once and regulariser weights mean the same for every layer.
        """

        def __init__(self, filters: Sequence[int], scale: Sequence[float] | None = None):
            super().__init__("FilterScore")
            self.filters = tf.constant(list(filters), tf.int32)
            self.scale = tf.constant(np.ones(len(filters)) if scale is None else np.asarray(scale), tf.float32)

        def __call__(self, output: tf.Tensor) -> tf.Tensor:
            means = tf.reduce_mean(tf.cast(output, tf.float32), axis=list(range(1, len(output.shape) - 1)))
            return tf.gather(means, self.filters[:, None], axis=1, batch_dims=1)[:, 0] / self.scale

    class StderrProgress(Callback):
        """One line per ``every`` steps on stderr, so long runs show they are alive without a progress
        bar that garbles logs."""

        def __init__(self, label: str, every: int = 16):
            self.label = label
            self.every = max(1, every)
            self.steps = 0

        def on_begin(self, steps: int | None = None, **kwargs) -> None:
            self.steps = int(steps or 0)

        def __call__(self, i, values, grads, scores, model_outputs, **kwargs) -> None:
            step = i + 1
            if step % self.every == 0 or step == self.steps:
                score = float(np.mean([np.mean(np.asarray(s)) for s in scores]))
                print(f"{self.label}: step {step}/{self.steps}, score {score:.3g} (mean activation / random-input std)",
                      file=sys.stderr, flush=True)

    class RmsNorm(Regularizer):
        """``weight`` times the images' root mean square, as tf-keras-vis' ``Norm(weight, p=2)``, but with a finite
        gradient at an all-black image: ``Norm``'s ``tf.norm`` has 0/0 there, so a filter that prefers dark input,
        driven to 0 by the clipping, came out as NaN pixels (stem_conv filters 8 and 10 of the shipped model)."""

        def __init__(self, weight: float, epsilon: float = 1e-6):
            super().__init__("RmsNorm")
            self.weight = float(weight)
            self.epsilon = float(epsilon)

        def __call__(self, input_value: tf.Tensor) -> tf.Tensor:
            squares = tf.reshape(tf.square(tf.cast(input_value, tf.float32)), (tf.shape(input_value)[0], -1))
            return self.weight * tf.sqrt(tf.reduce_mean(squares, axis=1) + self.epsilon)

    class SeededJitter(Jitter):
        """tf-keras-vis' ``Jitter`` with its shifts drawn from ``rng``: its own come from numpy's global generator,
        which ``maximize_filters``' ``seed`` would not reach. The same draw: ``randint(-jitter, jitter)`` per axis."""

        def __init__(self, jitter: int, rng: np.random.Generator):
            super().__init__(jitter)
            self.rng = rng

        def __call__(self, seed_input: tf.Tensor) -> tf.Tensor:
            axes = tuple(range(1, len(seed_input.shape) - 1))
            shifts = tuple(int(v) for v in self.rng.integers(-self.jitter, self.jitter, len(axes)))
            return tf.roll(seed_input, shift=shifts, axis=axes)

    classes = (FilterScore, StderrProgress, RmsNorm, SeededJitter)
    for cls in classes:
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


def __getattr__(name: str) -> Any:
    """``fer_keras.filters.FilterScore``, ``.StderrProgress`` and ``.RmsNorm`` (PEP 562), built by
    :func:`_tf_keras_vis_classes`."""
    if name in ("FilterScore", "StderrProgress", "RmsNorm"):
        return _tf_keras_vis_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _describe(filters: Sequence[int]) -> str:
    if len(filters) == 1:
        return f"filter {filters[0]}"
    if list(filters) == list(range(filters[0], filters[-1] + 1)):
        return f"filters {filters[0]}-{filters[-1]}"
    return "filters " + ",".join(map(str, filters))


def _clip_to_pixels(x: tf.Tensor) -> tf.Tensor:
    import tensorflow as tf

    return tf.clip_by_value(x, *PIXEL_RANGE)


# Outcomes of activation maximisation per filter (``Maximization.status``).
MAXIMISED, NOT_MAXIMISED, DEAD = "maximised", "not maximised", "dead"


@dataclasses.dataclass
class Maximization:
    """Result per filter: the optimised inputs (0-255), the mean activation they reach, the mean and
    per-position spread of the activation on random uniform 0-255 images (the baseline), where each
    optimisation started (``from_image``: the filter's natural start, else noise) and the activation
    there, and the outcome: ``maximised``, ``not maximised`` (no gain over the start) or ``dead``
    (constant on noise and on its natural start: nothing to optimise; its image is the start)."""

    filters: list[int]
    images: np.ndarray
    activations: np.ndarray
    random_mean: np.ndarray
    random_std: np.ndarray
    start_activations: np.ndarray
    from_image: np.ndarray
    status: list[str]


def maximize_filters(
    model: keras.Model,
    layer: str,
    filters: Sequence[int],
    steps: int = DEFAULT_STEPS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    tv_weight: float = DEFAULT_TV_WEIGHT,
    norm_weight: float = DEFAULT_NORM_WEIGHT,
    jitter: int = 0,
    rotate: float = 0.0,
    batch_size: int = 16,
    seed: int | None = None,
    progress: Callable[[str], Callback | None] | None = None,
    natural_starts: np.ndarray | None = None,
) -> Maximization:
    """Optimises one input per filter to maximise its mean activation, ``batch_size`` filters at once.

    Each starts from uniform noise, except a filter whose activation is constant on noise (a ReLU
    channel that noise never switches on): noise gives it no gradient, so it starts from its row of
    ``natural_starts`` (e.g. the image of a split activating it most), if that image moves it.
    Adam with a pixel-sized learning rate replaces tf-keras-vis' RMSprop(1.0) default, which barely
    moves 0-255 inputs whose gradients are tiny; it runs without momentum (``beta_1=0``) because
    tf-keras-vis' Jitter shifts the image permanently while momentum stays where it was. Jitter and
    rotation are off by default: on 48-pixel images they cost most of the activation (a rotation
    resamples, i.e. blurs, the image every step; a shift breaks the phase of strided convolutions).
    ``progress(label)`` may return a tf-keras-vis callback per batch.
    """
    import keras
    import tensorflow as tf
    from tf_keras_vis.activation_maximization import ActivationMaximization
    from tf_keras_vis.activation_maximization.input_modifiers import Rotate2D
    from tf_keras_vis.activation_maximization.regularizers import TotalVariation2D

    classes = _tf_keras_vis_classes()
    filter_score = classes["FilterScore"]
    sub = filter_model(model, layer)
    filters = check_filters(sub, layer, filters)
    shape = tuple(int(d) for d in sub.inputs[0].shape[1:])
    if natural_starts is not None and np.shape(natural_starts) != (len(filters),) + shape:
        raise ValueError(f"natural_starts has shape {np.shape(natural_starts)}, not {(len(filters),) + shape}")
    rng = np.random.default_rng(seed)
    probes = rng.uniform(*PIXEL_RANGE, (RANDOM_PROBES,) + shape).astype(np.float32)
    with quiet_keras():
        layer_maps = np.asarray(sub(as_batch(probes), training=False), np.float32)
    random_maps = layer_maps[..., filters]
    random_mean = random_maps.mean(axis=(0, 1, 2))
    # Spread of single positions, not of the image means: the latter shrinks with the map size.
    random_range, random_std = np.ptp(random_maps, axis=(0, 1, 2)), random_maps.std(axis=(0, 1, 2))
    # A difference below this is round-off at the layer's scale (of all its channels, so that a filter's verdict
    # does not depend on which others are chosen). "Constant" thus means exactly so, as a ReLU's zeros are.
    tolerance = 1e-6 * max(1.0, float(np.abs(layer_maps).max()))
    scale = np.maximum(random_std, tolerance)

    modifiers: list = []
    if jitter > 0:
        modifiers.append(classes["SeededJitter"](jitter, np.random.default_rng(rng.integers(2**63))))
    if rotate > 0:
        rotation = Rotate2D(rotate)
        rotation.random_generator = np.random.default_rng(rng.integers(2**63))  # its own is seeded by the OS
        modifiers.append(rotation)
    modifiers.append(_clip_to_pixels)
    regularizers = [TotalVariation2D(tv_weight), classes["RmsNorm"](norm_weight)]

    starts = rng.uniform(*PIXEL_RANGE, (len(filters),) + shape).astype(np.float32)
    silent = random_range <= tolerance
    from_image = np.zeros(len(filters), bool)
    dead = np.zeros(len(filters), bool)
    if silent.any() and natural_starts is not None:
        natural = np.asarray(natural_starts, np.float32)[silent]
        with quiet_keras():
            natural_maps = np.asarray(sub(as_batch(natural), training=False), np.float32)
        picked = natural_maps[np.arange(len(natural)), ..., np.asarray(filters)[silent]]  # [S, h, w]
        natural_range, natural_std = np.ptp(picked, axis=(1, 2)), picked.std(axis=(1, 2))
        # It moves if it varies over the image, or differs from its constant on noise (on a 1x1 map it cannot vary).
        off_constant = np.abs(picked - random_mean[silent][:, None, None]).max(axis=(1, 2))
        moves = (natural_range > tolerance) | (off_constant > tolerance)
        rows = np.flatnonzero(silent)
        from_image[rows[moves]] = True
        dead[rows[~moves]] = True
        starts[rows[moves]] = natural[moves]
        scale[rows[moves]] = np.maximum(natural_std[moves], tolerance)
    elif silent.any():
        logging.warning("%s: %s constant on noise and given no natural start: their activation cannot change", layer,
                        _describe([f for f, s in zip(filters, silent) if s]))

    images = []
    visualizer = ActivationMaximization(sub, clone=False)
    for start in range(0, len(filters), batch_size):
        chunk = filters[start:start + batch_size]
        label = f"{layer} {_describe(chunk)}"
        callback = progress(label) if progress else None
        with quiet_keras():
            result = visualizer(
                filter_score(chunk, scale[start:start + len(chunk)]),
                tf.constant(starts[start:start + len(chunk)]),
                input_range=PIXEL_RANGE,
                input_modifiers=modifiers,
                regularizers=regularizers,
                steps=steps,
                optimizer=keras.optimizers.Adam(float(learning_rate), beta_1=0.0),
                callbacks=[callback] if callback else None,
            )
        images.append(np.asarray(result, np.float32))
    optimised = np.concatenate(images)
    optimised[dead] = starts[dead]
    diagonal = np.arange(len(filters))
    reached = channel_means(sub, optimised, filters)[diagonal, diagonal]
    start_activations = channel_means(sub, starts, filters)[diagonal, diagonal]
    # A gain of a thousandth of the filter's spread is no gain: round-off and the regularisers' drift.
    gained = reached - start_activations > 1e-3 * scale
    status = [DEAD if d else MAXIMISED if g else NOT_MAXIMISED for d, g in zip(dead, gained)]
    return Maximization(filters, optimised, reached, random_mean, random_std, start_activations, from_image, status)


# --------------------------------------------------------------------------------------------
# Figures


def _grid(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(max(n, 1), max_cols)
    return (max(n, 1) + cols - 1) // cols, cols


def _panels(n: int) -> tuple[Figure, list[Axes]]:
    """A near-square grid of ``n`` tick-less panels (spare cells hidden)."""
    rows, cols = _grid(n)
    fig = new_figure(1.7 * cols, 2.0 * rows + 0.7)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[:n]:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def _png(fig: Figure, title: str) -> bytes:
    # A fixed distance from the top: the default, a fraction of the height, lands on the first row of a tall grid.
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / fig.get_figheight(), va="top")
    fig.tight_layout()
    return png_bytes(fig, dpi=90)


def _maximization_caption(f: int, result: Maximization, j: int) -> tuple[str, str]:
    """A panel's title and its colour: the activation reached against the baseline, or what went wrong."""
    act = result.activations[j]
    if result.status[j] == DEAD:
        return f"filter {f}\ndead: {act:.3g} everywhere", "tab:red"
    baseline = (f"start {result.start_activations[j]:.2g}" if result.from_image[j]
                else f"random {result.random_mean[j]:.2g}")
    if result.status[j] == NOT_MAXIMISED:
        return f"filter {f}: not maximised\n{act:.3g} ({baseline})", "tab:red"
    return f"filter {f}\n{act:.3g} ({baseline})", "black"


def plot_maximization(layer: str, result: Maximization) -> bytes:
    """Optimised inputs in a grid, each titled with its activation and the random baseline (or the activation on its
    natural start); a dead filter's panel is left blank, and failures are titled in red; as PNG."""
    fig, axes = _panels(len(result.filters))
    for j, (ax, f, image) in enumerate(zip(axes, result.filters, result.images)):
        if result.status[j] != DEAD:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        title, colour = _maximization_caption(f, result, j)
        ax.set_title(title, fontsize=7, color=colour)
    lines = [f"{layer}: inputs maximising mean activation"]
    if result.from_image.any():
        lines.append('"start": the activation on its top image, where it started, as noise does not move it')
    if DEAD in result.status:
        lines.append("dead: constant on noise and on its top image")
    # About 14 characters of 9-point text per inch: a narrow grid (two filters) must not clip its notes.
    width = max(20, int(fig.get_figwidth() * 14))
    return _png(fig, "\n".join(textwrap.fill(line, width) for line in lines))


def plot_feature_maps(layer: str, image: np.ndarray, filters: Sequence[int], maps: np.ndarray,
                      title: str = "") -> bytes:
    """The input followed by each filter's feature map (own colour scale, max in the title); as PNG."""
    fig, axes = _panels(len(filters) + 1)
    axes[0].imshow(np.asarray(image, np.float32)[..., 0], cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("input", fontsize=7)
    for ax, f, fmap in zip(axes[1:], filters, maps):
        ax.imshow(fmap, cmap="viridis", interpolation="nearest")
        ax.set_title(f"filter {f}\nmax {float(fmap.max()):.3g}", fontsize=7)
    return _png(fig, f"{layer} feature maps {maps.shape[1]}x{maps.shape[2]}  {title}")


def plot_top_k(layer: str, filters: Sequence[int], images: np.ndarray, ids: np.ndarray, indices: np.ndarray,
               values: np.ndarray, dead: Sequence[bool] | None = None, split_label: str = "") -> bytes:
    """One row per filter: its top-k images, titled with image id and mean activation; a dead filter's row is left
    blank, as its "top" images are merely the first of equals; as PNG."""
    rows, cols = len(filters), indices.shape[1]
    fig = new_figure(1.5 * cols + 0.6, 1.6 * rows + 0.5)
    axes = fig.subplots(max(rows, 1), max(cols, 1), squeeze=False)
    for r, f in enumerate(filters):
        for c in range(cols):
            ax = axes[r][c]
            if dead is not None and dead[r]:
                ax.set_title(f"dead: {values[r, c]:.3g}" if c == 0 else "", fontsize=6, color="tab:red")
            else:
                ax.imshow(images[indices[r, c]][..., 0], cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{ids[indices[r, c]]}: {values[r, c]:.3g}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(f"filter {f}", fontsize=7)
    where = f"{split_label} " if split_label else ""
    return _png(fig, f"{layer}: top-{cols} {where}images per filter (mean activation)")


# --------------------------------------------------------------------------------------------
# Entrypoint


def analyse_layer(model: keras.Model, layer: str, filters: Sequence[int] | None, split: fer_data.Split,
                  image: np.ndarray, image_title: str, output_dir: Path, top_k: int,
                  progress: Callable[[str], Callback | None] | None = None, split_label: str = "",
                  **maximize_kwargs) -> tuple[dict, dict[Path, bytes]]:
    """All three views of one layer: its part of ``filters.json``, and its figures as PNG bytes by the path in
    ``output_dir`` they are for. Nothing is written: the caller writes them (:func:`analyse_layers`).
    ``split_label`` names ``split`` in the top-k figure, e.g. "val (PublicTest)"."""
    sub = filter_model(model, layer)
    channels = int(sub.outputs[0].shape[-1])
    filters = check_filters(sub, layer, filters if filters else range(min(DEFAULT_FILTERS, channels)))
    print(f"{layer}: scanning {len(split)} images for the top {top_k}", file=sys.stderr, flush=True)
    indices, values = top_k_images(model, layer, split.images, filters, top_k)
    natural_starts = split.images[indices[:, 0]] if indices.shape[1] else None
    result = maximize_filters(model, layer, filters, progress=progress, natural_starts=natural_starts,
                              **maximize_kwargs)
    maps = feature_maps(model, layer, image, filters)
    paths = {"maximization": output_dir / f"{layer}_maximization.png",
             "feature_maps": output_dir / f"{layer}_feature_maps.png",
             "top_k": output_dir / f"{layer}_top{indices.shape[1]}.png"}
    figures = {
        paths["maximization"]: plot_maximization(layer, result),
        paths["feature_maps"]: plot_feature_maps(layer, image, filters, maps, image_title),
        paths["top_k"]: plot_top_k(layer, filters, split.images, split.ids, indices, values,
                                   [status == DEAD for status in result.status], split_label),
    }
    entry = {
        "output_shape": [None] + [int(d) for d in sub.outputs[0].shape[1:]],
        "figures": {kind: str(path) for kind, path in paths.items()},
        "filters": [
            {
                "filter": f,
                "status": result.status[j],
                "start": ({"index": int(indices[j, 0]), "id": str(split.ids[indices[j, 0]])}
                          if result.from_image[j] else "noise"),
                "start_activation": float(result.start_activations[j]),
                "max_activation": float(result.activations[j]),
                "random_mean_activation": float(result.random_mean[j]),
                "random_std_activation": float(result.random_std[j]),
                "feature_map_mean": float(maps[j].mean()),
                "top_k": [
                    {"index": int(i), "id": str(split.ids[i]), "label": int(split.labels[i]),
                     "label_name": CLASS_NAMES[split.labels[i]] if split.labels[i] >= 0 else None,
                     "activation": float(v)}
                    for i, v in zip(indices[j], values[j])
                ],
            }
            for j, f in enumerate(filters)
        ],
    }
    return entry, figures


def summarise_layer(entry: dict) -> str:
    """One line on a layer's part of ``filters.json``: the range reached, and how many filters did not get there
    from noise."""
    rows = entry["filters"]
    gains = [r["max_activation"] for r in rows if r["status"] != DEAD]
    text = f"{len(rows)} filters"
    if gains:
        text += f", activation reached {min(gains):.3g}-{max(gains):.3g}"
    started = sum(r["start"] != "noise" for r in rows)
    counts = [(started, f"started from {'its' if started == 1 else 'their'} top image, as noise did not move "
                        f"{'it' if started == 1 else 'them'}"),
              (sum(r["status"] == NOT_MAXIMISED for r in rows), "not maximised"),
              (sum(r["status"] == DEAD for r in rows), "dead (constant on noise and on the top image)")]
    return text + "".join(f"; {n} {what}" for n, what in counts if n)


def write_figures(figures: dict[Path, bytes]) -> None:
    """Writes PNG bytes to their paths, each atomically."""
    from fer_keras.predict import atomic_write

    for path, content in figures.items():
        atomic_write(path, content)


def analyse_layers(model: keras.Model, layers: Sequence[str], filters: Sequence[int] | None, split: fer_data.Split,
                   image: np.ndarray, image_title: str, output_dir: Path, top_k: int,
                   progress: Callable[[str], Callback | None] | None = None, split_label: str = "",
                   **maximize_kwargs) -> dict[str, dict]:
    """:func:`analyse_layer` of each layer; the figures are written only once every layer is done, so a run stopped
    midway leaves the figures of the run before it, which its ``filters.json`` describes."""
    figures: dict[Path, bytes] = {}
    entries = {}
    for layer in layers:
        entries[layer], layer_figures = analyse_layer(model, layer, filters, split, image, image_title, output_dir,
                                                      top_k, progress, split_label, **maximize_kwargs)
        figures.update(layer_figures)
        print(f"{layer}: {summarise_layer(entries[layer])}", flush=True)
    write_figures(figures)
    return entries


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A .keras file, training run directory or SavedModel export; "
                        "default: the shipped model.")
    flags.DEFINE_string("data", None, "FER2013 in any layout fer_keras.data reads; default: the bundled sample.")
    cli.define_skip_bad_rows()
    flags.DEFINE_string("split", "val", "Split for the top-k images and --image_index: train, val or test.")
    flags.DEFINE_list("layers", list(DEFAULT_LAYERS), "Layers with feature maps to look at; default: the stem after "
                      "its BatchNorm and ReLU, and the last residual block.")
    flags.DEFINE_list("filters", None, f"Filter indices, e.g. 0,3,8-11; default: the first {DEFAULT_FILTERS}.")
    flags.DEFINE_integer("steps", DEFAULT_STEPS, "Activation maximisation steps.")
    flags.DEFINE_float("learning_rate", DEFAULT_LEARNING_RATE,
                       "Adam learning rate, about the pixel change (0-255) per step.")
    flags.DEFINE_float("tv_weight", DEFAULT_TV_WEIGHT, "TotalVariation2D weight: higher = smoother images.")
    flags.DEFINE_float("norm_weight", DEFAULT_NORM_WEIGHT, "Weight of the images' RMS (L2 norm): higher = "
                       "darker, lower-contrast images.")
    flags.DEFINE_integer("jitter", 0, "tf-keras-vis Jitter: random shift in pixels per step (0 = off). "
                         "Smoother, more natural images at the cost of activation.")
    flags.DEFINE_float("rotate", 0.0, "tf-keras-vis Rotate2D: random rotation in degrees per step (0 = off; blurs).")
    flags.DEFINE_integer("batch_size", 16, "Filters optimised together.")
    flags.DEFINE_integer("top_k", 5, "Images per filter in the top-k grid.")
    flags.DEFINE_integer("image_index", 0, "Index in --split of the image whose feature maps are drawn.")
    flags.DEFINE_string("image", None, "An image file for the feature maps instead of --image_index.")
    flags.DEFINE_string("output_dir", "reports/filters", "Folder for the PNGs and filters.json.")
    cli.define_seed(0, "Random seed (seeds, jitter).")
    for name in ("steps", "batch_size", "top_k"):
        flags.register_validator(name, lambda v: v >= 1, f"--{name} must be >= 1")
    for name in ("tv_weight", "norm_weight", "rotate", "jitter", "image_index"):
        flags.register_validator(name, lambda v: 0 <= v < math.inf, f"--{name} must be a number >= 0")
    flags.register_validator("learning_rate", lambda v: 0 < v < math.inf, "--learning_rate must be a number > 0")
    flags.register_validator("output_dir", lambda v: bool(v and v.strip()), "--output_dir must not be empty")
    flags.register_validator("layers", lambda v: bool(v), "--layers needs at least one layer name")
    flags.register_validator("split", lambda v: v.strip().lower() in fer_data.SPLIT_ALIASES,
                             "--split must be train, val (PublicTest) or test (PrivateTest)")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    if f.image and f["image_index"].present:
        raise ConfigError("give either --image or --image_index, not both")
    filters = parse_int_list(f.filters, "--filters") if f.filters else None
    data = fer_data.load(f.data, skip_bad_rows=f.skip_bad_rows)
    split = data.split(f.split)
    if f.image:
        image, converted = fer_data.read_image(f.image)
        fer_data.warn_converted(f.image, converted)
        image_info = {"source": f.image}
        image_title = Path(f.image).name
    else:
        i = split_indices(split, [f.image_index], data.source, f.split)[0]
        image = split.images[i]
        image_info = {"source": data.source, "split": fer_data.canonical_split(f.split), "index": i,
                      "id": str(split.ids[i])}
        image_title = f"({fer_data.canonical_split(f.split)} #{i}, id {split.ids[i]})"
    if f.top_k > len(split):
        logging.warning("--top_k %d exceeds the %d images of %s; showing all", f.top_k, len(split), f.split)
    import keras

    from fer_keras.inference import load_keras

    model = load_keras(f.model)
    for layer in f.layers:
        sub = filter_model(model, layer)
        if filters:
            check_filters(sub, layer, filters)
    keras.utils.set_random_seed(f.seed)
    out = Path(f.output_dir)
    check_json_replaceable(out / "filters.json", REPORT_KEYS, "a filters report")
    out.mkdir(parents=True, exist_ok=True)
    settings = {name: f[name].value for name in ("steps", "learning_rate", "tv_weight", "norm_weight",
                                                   "jitter", "rotate", "top_k", "seed")}
    report = {
        "model": str(Path(f.model).resolve()) if f.model else "shipped model",
        "data": data.source,
        "split": fer_data.canonical_split(f.split),
        "feature_map_image": image_info,
        "settings": settings,
        "layers": {},
    }
    progress = _tf_keras_vis_classes()["StderrProgress"]
    report["layers"] = analyse_layers(
        model, f.layers, filters, split, image, image_title, out, f.top_k,
        progress=lambda label: progress(label, every=max(1, f.steps // 8)),
        split_label=fer_data.split_label(f.split),
        steps=f.steps, learning_rate=f.learning_rate, tv_weight=f.tv_weight, norm_weight=f.norm_weight,
        jitter=f.jitter, rotate=f.rotate, batch_size=f.batch_size, seed=f.seed,
    )
    atomic_write_text(out / "filters.json", json.dumps(report, indent=2) + "\n")
    figures = [Path(p).name for entry in report["layers"].values() for p in entry["figures"].values()]
    print(f"wrote {', '.join(figures)} and filters.json to {out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
