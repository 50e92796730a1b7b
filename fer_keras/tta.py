"""Test-time augmentation: class probabilities averaged over several views of each image.

* ``none``: the image itself;
* ``flip``: the image and its horizontal mirror image (faces are roughly left-right symmetric);
* ``tencrop``: the four corner crops and the centre crop of ``crop_size`` pixels plus their mirror
  images, each resized back to 48x48 (bilinear) because the model only takes 48x48 inputs. A model
  trained on crops (``input_crop``) sees only its central window: its ten crops are its own window size,
  and each is shifted into the centre instead of resized, so the model sees the crop pixel for pixel.

Probabilities (softmax outputs), not logits, are averaged, as in the original report. TensorFlow is
imported only when views are built, so that the command-line tools can reject bad flags quickly.

:func:`choose_tta` makes the choice of TTA a measurement: every mode on a labelled split (the one that
selected the epoch), the cheapest mode within a tolerance of the best kept, so that a mode costing five
times as much is not served for a difference of a few images.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from fer_keras import IMAGE_SIZE, NUM_CLASSES
from fer_keras.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

TTA_MODES = ("none", "flip", "tencrop")  # in order of cost: 1, 2 and 10 model evaluations per image
AUTO = "auto"
DEFAULT_CROP_SIZE = 40
# The signature of an export with TTA built in that serves the image alone (fer_keras.export).
NO_TTA_SIGNATURE = "serving_no_tta"
UNKNOWN_TTA = "unknown"  # an export with a view-free signature whose metadata, naming its views, is gone
# Percentage points by which a costlier mode must beat a cheaper one to be chosen by choose_tta. On PublicTest's
# 3,589 images a gain of 8 images (0.223 points) is within it and one of 9 (0.251 points) is not.
DEFAULT_TOLERANCE = 0.25


class ProbabilityModel(Protocol):
    """What TTA needs from a model: :class:`fer_keras.inference.Predictor` has it (and ``input_crop``, the
    central window the model sees, 0 when absent)."""

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray: ...


def check_tta(mode: str, crop_size: int = DEFAULT_CROP_SIZE) -> None:
    """Raises :class:`ConfigError` for an unknown mode or a crop that does not fit the image."""
    if mode not in TTA_MODES:
        raise ConfigError(f"unknown tta {mode!r}; choose one of {', '.join(TTA_MODES)}")
    if mode == "tencrop" and not 0 < crop_size <= IMAGE_SIZE:
        raise ConfigError(f"crop_size must be in 1-{IMAGE_SIZE} for tencrop, got {crop_size}")


def crop_sides(crop_size: int | Sequence[int]) -> list[int]:
    """One crop side or several, as a list without repeats, in the order given."""
    return [crop_size] if isinstance(crop_size, int) else list(dict.fromkeys(crop_size))


def crop_sides_ok(values: Sequence[str]) -> bool:
    """Whether flag values name one or more crop sides in 1-48 (``isdecimal``: ``int`` takes no superscript)."""
    return bool(values) and all(v.strip().isdecimal() and 0 < int(v) <= IMAGE_SIZE for v in values)


def num_views(mode: str) -> int:
    return {"none": 1, "flip": 2, "tencrop": 10}[mode]


def crop_offsets(crop_size: int, image_size: int = IMAGE_SIZE) -> list[tuple[int, int]]:
    """(top, left) of the top-left, top-right, bottom-left, bottom-right and centre crops. An odd margin puts the
    centre crop's at half of it rounded down (41: 3), where torchvision's CenterCrop rounds half to even (41: 4)."""
    far = image_size - crop_size
    centre = far // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]


def model_crop_of(predictor: object) -> int:
    """The central window ``predictor`` sees: :class:`fer_keras.inference.Predictor`'s ``input_crop``, 0 for a
    :class:`ProbabilityModel` that has only ``probabilities`` (the tests' stand-ins)."""
    return getattr(predictor, "input_crop", 0)


def effective_crop(crop_size: int, model_crop: int) -> int:
    """Ten-crop's crop side: a model that sees only a central window is shown windows of its own size."""
    return model_crop or crop_size


def tf_views(images: tf.Tensor, mode: str, crop_size: int = DEFAULT_CROP_SIZE, model_crop: int = 0) -> tf.Tensor:
    """The views of a float32 ``[N, 48, 48, 1]`` tensor as one batch ``[V * N, 48, 48, 1]``, view-major.

    Exports trace it into their serving function and :func:`views` computes with it, so the served TTA is
    the evaluate tool's TTA. ``model_crop``: the central window the model sees (0: all of it).
    """
    import tensorflow as tf

    check_tta(mode, crop_size)
    base = [images]
    if mode == "tencrop" and model_crop:
        # Shift each window into the centre, where the model's crop takes exactly it; what the shift brings in
        # (zeros) lies outside that crop.
        margin = (IMAGE_SIZE - model_crop) // 2
        padded = tf.pad(images, [[0, 0], [margin, margin], [margin, margin], [0, 0]])
        base = [padded[:, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE, :] for top, left in crop_offsets(model_crop)]
    elif mode == "tencrop":
        base = [images[:, top:top + crop_size, left:left + crop_size, :] for top, left in crop_offsets(crop_size)]
        if crop_size != IMAGE_SIZE:
            base = [tf.image.resize(crop, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear") for crop in base]
    if mode in ("flip", "tencrop"):
        base += [tf.reverse(view, axis=[2]) for view in base]
    return tf.concat(base, axis=0) if len(base) > 1 else base[0]


def views(images: np.ndarray, mode: str, crop_size: int = DEFAULT_CROP_SIZE, model_crop: int = 0) -> np.ndarray:
    """The augmented views of a batch as float32 ``[V, N, 48, 48, 1]`` pixels in 0-255."""
    check_tta(mode, crop_size)
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ConfigError(f"expected images of shape [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1], got {list(x.shape)}")
    import tensorflow as tf

    return tf_views(tf.constant(x), mode, crop_size, model_crop).numpy().reshape((num_views(mode),) + x.shape)


def tta_probabilities(
    predictor: ProbabilityModel,
    images: np.ndarray,
    mode: str = "none",
    crop_size: int = DEFAULT_CROP_SIZE,
    batch_size: int = 256,
) -> np.ndarray:
    """Mean softmax probabilities ``[N, 7]`` over the views of ``mode``.

    Images are processed ``batch_size`` at a time so that ten-crop never holds ten copies of a whole
    data set in memory. An export with test-time augmentation built in is refused any here: its views' views
    (ten-crop of ten-crop: 100 passes) are not a view set anyone measured (its network alone takes any:
    ``load_predictor(..., network_only=True)``). Ten-crop for a model trained on crops takes the predictor's
    ``input_crop``. An ensemble (a predictor with ``members``) averages its members' results, each computed with
    its own views.
    """
    check_tta(mode, crop_size)
    members = getattr(predictor, "members", None)
    if members:
        return np.mean([tta_probabilities(m, images, mode, crop_size, batch_size) for m in members],
                       axis=0).astype(np.float32)
    built_in = getattr(predictor, "built_in_tta", "none")
    if mode != "none" and built_in != "none":
        which = (f"{built_in} views (the TTA built into the export)" if built_in != UNKNOWN_TTA else
                 "views built into the export, which its missing metadata (assets.extra/fer_keras.json) named")
        raise ConfigError(f"{getattr(predictor, 'path', 'the model')} already averages {which}; --tta={mode} would "
                          "average views of those views: use --tta=none")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(images), batch_size):
        batch = views(images[start:start + batch_size], mode, crop_size, model_crop_of(predictor))
        v, n = batch.shape[:2]
        probs = predictor.probabilities(batch.reshape((v * n,) + batch.shape[2:]), batch_size)
        out.append(np.asarray(probs, np.float32).reshape(v, n, -1).mean(axis=0))
    if not out:
        return np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class TtaChoice:
    """The measured accuracy of every TTA mode on one labelled split, and the mode chosen from them. With several
    crop sides measured, ``tencrop`` is the best side's (``crop_size``) and ``tencrop_by_crop_size`` holds each."""

    mode: str
    accuracy: dict[str, float]
    split: str
    num_images: int
    tolerance: float
    crop_size: int
    tencrop_by_crop_size: dict[int, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        record = {"chosen": self.mode, "accuracy": dict(self.accuracy), "split": self.split,
                  "num_images": self.num_images, "tolerance_points": self.tolerance, "crop_size": self.crop_size}
        if len(self.tencrop_by_crop_size) > 1:
            record["tencrop_by_crop_size"] = {str(c): acc for c, acc in self.tencrop_by_crop_size.items()}
        return record

    def summary(self) -> str:
        measured = ", ".join(f"{mode} {100 * acc:.2f} %" for mode, acc in self.accuracy.items())
        sides = ""
        if len(self.tencrop_by_crop_size) > 1:
            sides = ("; ten-crop with " + ", ".join(f"{c}-pixel crops {100 * acc:.2f} %"
                                                     for c, acc in self.tencrop_by_crop_size.items())
                     + f", {self.crop_size} kept")
        return (f"TTA chosen on {self.split} ({self.num_images:,} images): {self.mode}, the cheapest within "
                f"{self.tolerance:g} points of the best ({measured}{sides})")


def choose_tta(
    predictor: ProbabilityModel,
    images: np.ndarray,
    labels: np.ndarray,
    split: str,
    crop_size: int | Sequence[int] = DEFAULT_CROP_SIZE,
    batch_size: int = 256,
    tolerance: float = DEFAULT_TOLERANCE,
) -> TtaChoice:
    """Measures every mode on ``images``/``labels`` and returns the cheapest within ``tolerance`` points of
    the most accurate (:data:`TTA_MODES` is in order of cost). Ten-crop is measured with each crop side of
    ``crop_size`` (one, or several) and stands for the most accurate of them (the first of equals): every side
    costs the same ten passes, so the side is chosen as an epoch is, by accuracy alone. A model trained on crops
    is shown its own windows whatever the sides, so it is measured once."""
    labels = np.asarray(labels)
    if len(images) == 0 or len(labels) != len(images) or (labels < 0).any():
        raise ConfigError(f"choosing a TTA needs a labelled split; {split} has {len(images)} images and "
                          f"{int((labels < 0).sum()) if len(labels) else 0} without a label")
    if tolerance < 0:
        raise ConfigError(f"TTA tolerance must be >= 0 points, got {tolerance}")
    model_crop = model_crop_of(predictor)
    sides = crop_sides([effective_crop(c, model_crop) for c in crop_sides(crop_size)])
    if not sides:
        raise ConfigError("choosing a TTA needs at least one ten-crop crop side")

    def accuracy_of(mode: str, side: int) -> float:
        probs = tta_probabilities(predictor, images, mode, side, batch_size)
        return float(np.mean(np.argmax(probs, axis=1) == labels))

    accuracy = {mode: accuracy_of(mode, sides[0]) for mode in TTA_MODES if mode != "tencrop"}
    by_side = {side: accuracy_of("tencrop", side) for side in sides}
    best_side = max(by_side, key=by_side.get)  # the first of equals
    accuracy["tencrop"] = by_side[best_side]
    return TtaChoice(cheapest_within(accuracy, tolerance), accuracy, split, len(images), tolerance, best_side,
                     by_side)


def cheapest_within(accuracy: dict[str, float], tolerance: float) -> str:
    """The first mode of :data:`TTA_MODES` whose accuracy (a fraction) is within ``tolerance`` percentage
    points of the best."""
    best = max(accuracy.values())
    return next(m for m in TTA_MODES if m in accuracy and 100 * (best - accuracy[m]) <= tolerance + 1e-9)


def define_flags() -> None:
    """The TTA and batching flags shared by the evaluate and predict entrypoints."""
    from absl import flags

    flags.DEFINE_enum("tta", "none", TTA_MODES, "Test-time augmentation: none, flip (image + mirror image) or "
                      "tencrop (4 corner + centre crops and their mirror images, averaged).")
    flags.DEFINE_integer("crop_size", DEFAULT_CROP_SIZE, "Crop side in pixels for --tta=tencrop; a model "
                         "trained with --input_crop is shown crops of its own size instead.")
    flags.DEFINE_integer("batch_size", 256, "Images per model call.")
    flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1")
    flags.register_validator("crop_size", lambda v: 0 < v <= IMAGE_SIZE, f"--crop_size must be in 1-{IMAGE_SIZE}")
