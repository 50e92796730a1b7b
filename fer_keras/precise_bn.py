"""Precise BatchNorm: a trained model's BatchNorm statistics re-estimated on the images inference will see.

Training leaves each BatchNorm layer with exponential moving averages of the statistics of augmented batches
(shifted, zoomed, rotated, partly erased faces), taken while the weights still moved. Inference normalises clean
faces with them. Re-estimating the statistics with the weights fixed, as the average over many batches of clean
training images (PreciseBN: Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021), removes both differences.
Whether that serves better is a measurement, not a given: `python -m fer_keras.evaluate --precise_bn` makes it
(README, Results on FER2013: on the shipped versions 5-8 it moved PublicTest by -15 to +33 images without TTA;
with ten-crop it cost versions 7 and 8 49 and 64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fer_keras.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    import keras


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model``, those inside the residual blocks included."""
    import keras

    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


def reestimate(model: keras.Model, images: np.ndarray, batch_size: int = 256, name: str = "the model") -> int:
    """Replaces the moving mean and variance of every BatchNorm layer of ``model`` by their averages over
    ``images`` (uint8 or float pixels ``[N, 48, 48, 1]``, 0-255, unaugmented), ``batch_size`` at a time, each
    batch weighted by its size; returns the number of layers re-estimated.

    The model runs in training mode, where BatchNorm normalises with each batch's own statistics, so what every
    layer sees does not depend on the statistics being replaced and one pass suffices. The moving variance is the
    mean of the batches' biased variances, as the moving average during training takes them (PreciseBN's
    estimate; it leaves out the small spread of the batch means). Dropout draws masks in training mode, which
    changes nothing here (no BatchNorm follows it in ResNet-18) but advances its random state.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ModelError(f"{name}: has no BatchNormalization layer to re-estimate")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise DataError(f"{name}: no images to re-estimate BatchNorm statistics on")
    if any(not layer.trainable for layer in layers):
        raise ModelError(f"{name}: has frozen BatchNorm layers, which keep their statistics in training mode")
    import tensorflow as tf

    momenta = [layer.momentum for layer in layers]
    seen = 0
    try:
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], np.float32)
            # The running average after this batch: weight seen / (seen + n) on the batches before it.
            for layer in layers:
                layer.momentum = seen / (seen + len(batch))
            model(tf.convert_to_tensor(batch), training=True)
            seen += len(batch)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)
