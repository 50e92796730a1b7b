"""What the picture tools (saliency, filters, evaluate, history) share: tf-keras-vis glue, layer
lookup, index parsing with errors that name the source, and display-free figures."""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fer_keras import data as fer_data
from fer_keras.errors import ConfigError, DataError

if TYPE_CHECKING:  # imported where used, so that the tools answer a bad flag without them
    import keras
    import tensorflow as tf

# Longest range --indices or --filters take: FER2013's Training split is 28,709 images.
MAX_RANGE = 100_000


@contextmanager
def quiet_keras() -> Iterator[None]:
    """Hides Keras 3's "structure of `inputs` doesn't match" warning.

    tf-keras-vis always calls models with a list of inputs; Keras 3 warns on every call for a
    single-input functional model although the result is correct.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The structure of `inputs`", category=UserWarning)
        yield


@contextmanager
def numpy_seeded(seed: int | None) -> Iterator[None]:
    """Seeds numpy's global generator for the block and restores its state after it (``None``: leaves it alone).

    tf-keras-vis draws SmoothGrad's noise from that generator; a library call with a seed is then reproducible
    without changing what the caller's own ``np.random`` draws next.
    """
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def as_batch(images: np.ndarray) -> tf.Tensor:
    """float32 ``[N, H, W, C]``: tf-keras-vis cannot take gradients w.r.t. uint8 tensors."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ConfigError(f"expected images of shape [N, H, W, C], got {array.shape}")
    import tensorflow as tf

    return tf.convert_to_tensor(array.astype(np.float32))


def _output_rank(layer: keras.layers.Layer) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called more than once
        return 0


def check_layer(model: keras.Model, layer: str) -> keras.layers.Layer:
    """The named layer if its output is a feature map ``[N, H, W, C]``, else a one-line error."""
    try:
        found = model.get_layer(layer)
    except ValueError:
        maps = [lay.name for lay in model.layers if _output_rank(lay) == 4]
        raise ConfigError(
            f"model {model.name!r} has no layer {layer!r} (last layers with feature maps: {', '.join(maps[-6:])})"
        ) from None
    if _output_rank(found) != 4:
        raise ConfigError(f"layer {layer!r} of model {model.name!r} does not output feature maps [N, H, W, C]")
    return found


def parse_int_list(values: Sequence[str], what: str) -> list[int]:
    """``["3", "10-12"]`` -> ``[3, 10, 11, 12]``; ranges are inclusive, as users read them."""
    out: list[int] = []
    for value in values:
        text = str(value).strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ConfigError(f"{what}: range {text!r} is empty")
            if hi - lo >= MAX_RANGE:
                raise ConfigError(f"{what}: range {text!r} has more than {MAX_RANGE:,} numbers")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", text):
            out.append(int(text))
        else:
            raise ConfigError(f"{what}: {text!r} is not a non-negative integer or a range like 0-15")
    return out


def split_indices(split: fer_data.Split, indices: Sequence[int], source: str, split_name: str) -> list[int]:
    """Checks indices against the split so the error names the file, split and index."""
    n = len(split)
    for i in indices:
        if not 0 <= i < n:
            raise DataError(
                f"{source}: index {i} is out of range of split {fer_data.split_label(split_name)}, "
                f"which has {n} images (0-{n - 1})"
            )
    return list(indices)


def new_figure(width: float, height: float, dpi: float | None = None) -> Figure:
    """A figure drawn by the Agg canvas directly: no pyplot state, no display needed."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: float | None = None) -> bytes:
    """``fig`` rendered as PNG in memory, for writers that draw everything before they write anything."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **({"dpi": dpi} if dpi else {}))
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: float | None = None) -> Path:
    """Writes ``fig`` as PNG to ``path`` atomically (:func:`fer_keras.predict.atomic_write`): a kill or a full disk
    leaves the old picture, not half of a new one."""
    from fer_keras.predict import atomic_write

    return atomic_write(path, png_bytes(fig, dpi))
