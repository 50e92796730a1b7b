"""tf.data input pipelines with batched, stateless augmentation for 48x48 faces.

The training stream is a pure function of ``(seed, epoch)``: epoch ``e`` is a permutation drawn
from ``fold_in(seed, e)`` and batch ``s`` of it is augmented with ``fold_in(seed, e, s)``. A run
resumed at epoch ``e`` therefore sees exactly the batches an uninterrupted run would have seen.

Pixels stay uint8 through the pipeline (the model rescales): one affine warp per image covers
shift, rotation, zoom and horizontal flip in a single resampling, followed by random erasing and,
optionally, mixup (which also mixes the one-hot labels). For a model that sees only a central window
(``crop``, :func:`fer_keras.model.resnet18`'s ``input_crop``), the warp also shifts each image by a whole
number of pixels, so that the window is a random crop, and erasing stays inside the window.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from fer_keras import MAX_SEED, NUM_CLASSES
from fer_keras.augment import MEAN_GREY, AugmentConfig
from fer_keras.data import Split
from fer_keras.errors import ConfigError

AUTOTUNE = tf.data.AUTOTUNE


def _seed_word(seed: int) -> int:
    """The run's seed as the first word of a stateless seed pair; out of range it is refused, not cut to 31 bits
    (which made seed 2**31 repeat seed 0's data order)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def batch_seed(seed: int, epoch: tf.Tensor | int, step: tf.Tensor | int) -> tf.Tensor:
    base = tf.constant([_seed_word(seed), 0x5EED], tf.int64)
    s = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(s, tf.cast(step, tf.int64))


def affine_transforms(batch: int, size: int, config: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """Per-image output-to-input affine maps ``[batch, 8]`` for ImageProjectiveTransformV3."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    u = lambda i, lo, hi: tf.random.stateless_uniform([batch], seeds[i], lo, hi)  # noqa: E731
    theta = u(0, -1.0, 1.0) * (config.rotation * math.pi / 180.0)
    scale = u(1, 1.0 - config.zoom, 1.0 + config.zoom)
    shift = tf.reshape(tf.random.stateless_uniform([batch * 2], seeds[2], -1.0, 1.0), [batch, 2])
    shift = shift * (config.shift * size)
    if config.crop:
        # torchvision's RandomCrop: a window at a whole-pixel offset drawn uniformly; here the image moves instead.
        margin = (size - config.crop) // 2
        crop_seed = tf.random.experimental.stateless_fold_in(seed, 0xC40B)  # leaves the other draws as they were
        offsets = tf.random.stateless_uniform([batch, 2], crop_seed, -margin, margin + 1, dtype=tf.int32)
        shift = shift + tf.cast(offsets, tf.float32)
    if config.flip:
        flip = tf.where(tf.random.stateless_uniform([batch], seeds[3]) < 0.5, -1.0, 1.0)
    else:
        flip = tf.ones([batch])
    cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
    m00, m01 = cos * flip, -sin
    m10, m11 = sin * flip, cos
    c = (size - 1) / 2.0
    a2 = c + shift[:, 0] - m00 * c - m01 * c
    b2 = c + shift[:, 1] - m10 * c - m11 * c
    zeros = tf.zeros([batch])
    return tf.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1)


def random_erasing(
    images: tf.Tensor, probability: float, seed: tf.Tensor, max_area: float = 0.25, fill: str = "noise",
    window: int = 0,
) -> tf.Tensor:
    """Erases one rectangle (2 % to ``max_area`` of the image, aspect 0.3-3.3) per image with ``probability``.

    ``fill`` is ``noise`` (uniform 0-255) or ``mean`` (:data:`MEAN_GREY`, torchvision's value=0 on normalised input).
    ``window`` (0: the whole image) confines the rectangle, and the area it is a fraction of, to the central
    ``window`` pixels square: the crop the model sees, which is what torchvision erases after RandomCrop.
    """
    shape = tf.shape(images)
    batch = shape[0]
    if window:
        margin = tf.cast((images.shape[1] - window) // 2, tf.float32)
        h = w = tf.constant(window)
    else:
        margin = tf.constant(0.0)
        h, w = shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 6)
    area = tf.random.stateless_uniform([batch], seeds[0], 0.02, max_area) * tf.cast(h * w, tf.float32)
    log_ratio = tf.random.stateless_uniform([batch], seeds[1], math.log(0.3), math.log(3.3))
    ratio = tf.exp(log_ratio)
    eh = tf.minimum(tf.sqrt(area * ratio), tf.cast(h, tf.float32))
    ew = tf.minimum(tf.sqrt(area / ratio), tf.cast(w, tf.float32))
    top = margin + tf.random.stateless_uniform([batch], seeds[2]) * (tf.cast(h, tf.float32) - eh)
    left = margin + tf.random.stateless_uniform([batch], seeds[3]) * (tf.cast(w, tf.float32) - ew)
    apply = tf.random.stateless_uniform([batch], seeds[4]) < probability
    rows = tf.cast(tf.range(shape[1]), tf.float32)[None, :, None]
    cols = tf.cast(tf.range(shape[2]), tf.float32)[None, None, :]
    inside = (
        (rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
        & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None])
        & apply[:, None, None]
    )
    if fill == "mean":
        value = tf.fill(tf.shape(images), tf.cast(MEAN_GREY, images.dtype))
    else:
        value = tf.cast(tf.random.stateless_uniform(tf.shape(images), seeds[5], 0, 256, dtype=tf.int32), images.dtype)
    return tf.where(inside[..., None], value, images)


def augment_batch(images: tf.Tensor, config: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """Augments a uint8 batch ``[B, H, W, C]``; deterministic given ``seed``."""
    if config.geometric:
        batch = tf.shape(images)[0]
        size = images.shape[1]
        seeds = tf.random.experimental.stateless_split(seed, 2)
        transforms = affine_transforms(batch, size, config, seeds[0])
        # Warped in float32 and rounded: the op's uint8 kernel truncates, which darkens every warped image by
        # half a grey level on average against the unwarped images the model is evaluated on.
        warped = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(images, tf.float32), transforms=transforms, output_shape=tf.shape(images)[1:3],
            fill_value=0.0, interpolation="BILINEAR", fill_mode=config.fill_mode.upper(),
        )
        images = tf.cast(tf.clip_by_value(tf.round(warped), 0.0, 255.0), images.dtype)
        seed = seeds[1]
    if config.erasing > 0:
        images = random_erasing(images, config.erasing, seed, config.erasing_max_area, config.erasing_fill,
                                window=config.crop)
    return images


def mixup_batch(images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixes each example with its mirror in the batch (``i`` with ``B-1-i``; batches are already in random
    order), one weight ``lam ~ Beta(alpha, alpha)`` per example, images and labels alike.

    Mixed pixels are rounded back to uint8 (at most 0.5 grey levels off) so the pipeline keeps one dtype.
    """
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    a = tf.random.stateless_gamma([batch], seeds[0], alpha)
    b = tf.random.stateless_gamma([batch], seeds[1], alpha)
    lam = a / tf.maximum(a + b, 1e-12)
    x = tf.cast(images, tf.float32)
    mixed = lam[:, None, None, None] * x + (1.0 - lam[:, None, None, None]) * tf.reverse(x, axis=[0])
    mixed_labels = lam[:, None] * labels + (1.0 - lam[:, None]) * tf.reverse(labels, axis=[0])
    return tf.cast(tf.clip_by_value(tf.round(mixed), 0.0, 255.0), images.dtype), mixed_labels


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # Each global batch is split across replicas and workers (no file-based sharding exists).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _require_labels(split: Split, purpose: str) -> None:
    """Unlabelled images (label -1) would become an all-zero or a wrong one-hot label without a word."""
    unlabelled = np.flatnonzero(np.asarray(split.labels) < 0)
    if unlabelled.size:
        raise ConfigError(f"{unlabelled.size} of {len(split)} images have no label (the first: id "
                          f"{split.ids[unlabelled[0]]}); {purpose} needs labelled images")


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    return num_examples // global_batch_size


def train_dataset(
    split: Split,
    global_batch_size: int,
    seed: int,
    epochs: int,
    initial_epoch: int = 0,
    augment: AugmentConfig = AugmentConfig(),
    deterministic: bool = True,
    targets: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Yields ``(uint8 images, one-hot float32 labels)`` for epochs ``initial_epoch..epochs-1``,
    ``len(split) // global_batch_size`` full batches per epoch, in an order fixed by seed and epoch.

    ``targets`` (float32 ``[N, 7]``, rows summing to 1) replaces the one-hot labels: the soft targets of
    knowledge distillation (:mod:`fer_keras.distill`)."""
    _require_labels(split, "training")
    n = len(split)
    steps = steps_per_epoch(n, global_batch_size)
    if steps == 0:
        raise ConfigError(
            f"the training split has {n} images, fewer than one batch of {global_batch_size}; "
            "lower --batch_size"
        )
    images = tf.constant(split.images)
    if targets is None:
        labels = tf.one_hot(tf.constant(split.labels), NUM_CLASSES, dtype=tf.float32)
    else:
        targets = np.asarray(targets, np.float32)
        valid = targets.shape == (n, NUM_CLASSES) and (targets >= 0).all()
        if not valid or not np.allclose(targets.sum(axis=1), 1.0, atol=1e-4):
            raise ConfigError(f"targets must be {n} rows of {NUM_CLASSES} probabilities summing to 1, got shape "
                              f"{list(targets.shape)}")
        labels = tf.constant(targets)
    perm_base = tf.constant([_seed_word(seed), 0x0DE5], tf.int64)

    def epoch_batches(epoch):
        key = tf.random.experimental.stateless_fold_in(perm_base, epoch)
        perm = tf.argsort(tf.random.stateless_uniform([n], key))
        index = tf.reshape(perm[: steps * global_batch_size], [steps, global_batch_size])
        steps_ds = tf.data.Dataset.range(steps)
        return tf.data.Dataset.zip(
            tf.data.Dataset.from_tensors(epoch).repeat(steps), steps_ds,
            tf.data.Dataset.from_tensor_slices(index),
        )

    def make_batch(epoch, step, index):
        x = tf.gather(images, index)
        y = tf.gather(labels, index)
        key = batch_seed(seed, epoch, step)
        x = augment_batch(x, augment, key)
        if augment.mixup > 0:
            x, y = mixup_batch(x, y, augment.mixup, tf.random.experimental.stateless_fold_in(key, 0x313))
        return x, y

    ds = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
    ds = ds.map(make_batch, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return ds.with_options(_options(deterministic)).prefetch(AUTOTUNE)


def padded_size(num_examples: int, global_batch_size: int) -> int:
    """``num_examples`` rounded up to whole global batches: the length of a padded :func:`eval_dataset`."""
    return -(-num_examples // global_batch_size) * global_batch_size


def eval_dataset(split: Split, global_batch_size: int, with_labels: bool = True,
                 pad_to_batch: bool = False) -> tf.data.Dataset:
    """Batches a split in order, last batch partial; labels one-hot as in training.

    ``pad_to_batch`` fills the last batch up with black images of weight 0, yielding ``(images, labels,
    weights)``: a global batch split over replicas would otherwise give a replica no image at all when the last
    batch is short (1 image on 2 replicas), and on CPU devices that stops the run at its first validation
    ("Incompatible shapes: [128] vs. [0,24,24,64]" in ``stage2_block1``'s shortcut BatchNorm). Accuracy
    weighted so is exact; Keras' loss averages over the padded count
    (:class:`fer_keras.checkpoint.PaddedValidationLoss` scales it back)."""
    if with_labels:
        _require_labels(split, "evaluation")
        images, labels = split.images, np.eye(NUM_CLASSES, dtype=np.float32)[split.labels]
        if pad_to_batch:
            n = len(split)
            extra = padded_size(n, global_batch_size) - n
            weights = np.concatenate([np.ones(n, np.float32), np.zeros(extra, np.float32)])
            images = np.concatenate([images, np.zeros((extra, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros((extra, NUM_CLASSES), np.float32)])
            ds = tf.data.Dataset.from_tensor_slices((images, labels, weights))
        else:
            ds = tf.data.Dataset.from_tensor_slices((images, labels))
    else:
        if pad_to_batch:
            raise ValueError("pad_to_batch needs labels: the padding is marked by weight 0")
        ds = tf.data.Dataset.from_tensor_slices(split.images)
    return ds.batch(global_batch_size).with_options(_options(True)).prefetch(AUTOTUNE)
