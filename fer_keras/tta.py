"""Test-time augmentation: class probabilities averaged over several views of each image.

* ``none``: the image itself;
* ``flip``: the image and its horizontal mirror image (faces are roughly left-right symmetric);
* ``tencrop``: the four corner crops and the centre crop of ``crop_size`` pixels plus their mirror
  images, each resized back to 48x48 (bilinear) because the model only takes 48x48 inputs.

Probabilities (softmax outputs), not logits, are averaged, as in the original report. TensorFlow is
imported only when views are built, so that the command-line tools can reject bad flags quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from fer_keras import IMAGE_SIZE, NUM_CLASSES
from fer_keras.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

TTA_MODES = ("none", "flip", "tencrop")
DEFAULT_CROP_SIZE = 40


class ProbabilityModel(Protocol):
    """What TTA needs from a model: :class:`fer_keras.inference.Predictor` has it."""

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray: ...


def check_tta(mode: str, crop_size: int = DEFAULT_CROP_SIZE) -> None:
    """Raises :class:`ConfigError` for an unknown mode or a crop that does not fit the image."""
    if mode not in TTA_MODES:
        raise ConfigError(f"unknown tta {mode!r}; choose one of {', '.join(TTA_MODES)}")
    if mode == "tencrop" and not 0 < crop_size <= IMAGE_SIZE:
        raise ConfigError(f"crop_size must be in 1-{IMAGE_SIZE} for tencrop, got {crop_size}")


def num_views(mode: str) -> int:
    return {"none": 1, "flip": 2, "tencrop": 10}[mode]


def crop_offsets(crop_size: int, image_size: int = IMAGE_SIZE) -> list[tuple[int, int]]:
    """(top, left) of the top-left, top-right, bottom-left, bottom-right and centre crops."""
    far = image_size - crop_size
    centre = far // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]


def tf_views(images: tf.Tensor, mode: str, crop_size: int = DEFAULT_CROP_SIZE) -> tf.Tensor:
    """The views of a float32 ``[N, 48, 48, 1]`` tensor as one batch ``[V * N, 48, 48, 1]``, view-major.

    Exports trace it into their serving function and :func:`views` computes with it, so the served TTA is
    the evaluate tool's TTA.
    """
    import tensorflow as tf

    check_tta(mode, crop_size)
    base = [images]
    if mode == "tencrop":
        base = [images[:, top:top + crop_size, left:left + crop_size, :] for top, left in crop_offsets(crop_size)]
        if crop_size != IMAGE_SIZE:
            base = [tf.image.resize(crop, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear") for crop in base]
    if mode in ("flip", "tencrop"):
        base += [tf.reverse(view, axis=[2]) for view in base]
    return tf.concat(base, axis=0) if len(base) > 1 else base[0]


def views(images: np.ndarray, mode: str, crop_size: int = DEFAULT_CROP_SIZE) -> np.ndarray:
    """The augmented views of a batch as float32 ``[V, N, 48, 48, 1]`` pixels in 0-255."""
    check_tta(mode, crop_size)
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ConfigError(f"expected images of shape [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1], got {list(x.shape)}")
    import tensorflow as tf

    return tf_views(tf.constant(x), mode, crop_size).numpy().reshape((num_views(mode),) + x.shape)


def tta_probabilities(
    predictor: ProbabilityModel,
    images: np.ndarray,
    mode: str = "none",
    crop_size: int = DEFAULT_CROP_SIZE,
    batch_size: int = 256,
) -> np.ndarray:
    """Mean softmax probabilities ``[N, 7]`` over the views of ``mode``.

    Images are processed ``batch_size`` at a time so that ten-crop never holds ten copies of a whole
    data set in memory.
    """
    check_tta(mode, crop_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(images), batch_size):
        batch = views(images[start:start + batch_size], mode, crop_size)
        v, n = batch.shape[:2]
        probs = predictor.probabilities(batch.reshape((v * n,) + batch.shape[2:]), batch_size)
        out.append(np.asarray(probs, np.float32).reshape(v, n, -1).mean(axis=0))
    if not out:
        return np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(out)


def define_flags() -> None:
    """The TTA and batching flags shared by the evaluate and predict entrypoints."""
    from absl import flags

    flags.DEFINE_enum("tta", "none", TTA_MODES, "Test-time augmentation: none, flip (image + mirror image) or "
                      "tencrop (4 corner + centre crops and their mirror images, averaged).")
    flags.DEFINE_integer("crop_size", DEFAULT_CROP_SIZE, "Crop side in pixels for --tta=tencrop.")
    flags.DEFINE_integer("batch_size", 256, "Images per model call.")
    flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1")
    flags.register_validator("crop_size", lambda v: 0 < v <= IMAGE_SIZE, f"--crop_size must be in 1-{IMAGE_SIZE}")
