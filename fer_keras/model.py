"""ResNet-18 for 48x48 grayscale faces: a Keras functional model built from BasicBlock layers.

The model takes raw 0-255 pixels (uint8 or float) of shape ``(48, 48, 1)``; rescaling and
normalisation live inside it so that exports and users never pre-process. Stems:

* ``imagenet``: 7x7/2 conv + 3x3/2 max-pool, the torchvision structure the original PyTorch work
  used (48 -> 12 pixels before stage 1; ~94 MMAC per image);
* ``cifar_pool``: 3x3/1 conv + 2x2/2 max-pool (48 -> 24; ~313 MMAC), the best accuracy per cost;
* ``cifar``: 3x3/1 conv, no pool (48 -> 48; ~1,247 MMAC).

With ``input_channels=3`` the grey image is repeated to three channels by a parameter-free layer, so
the parameter count equals torchvision's ``resnet18(num_classes=7)``: 11,180,103.

With ``input_crop=C`` the network sees only the central CxC pixels (a ``Cropping2D`` named ``input_crop``),
as the published recipes' networks see 40x40 crops: its input stays 48x48, so every tool and export takes
the same images, training draws random CxC windows by shifting the image (:mod:`fer_keras.pipeline`), and
ten-crop presents the five CxC windows by shifting them into the centre (:mod:`fer_keras.tta`). A 40-pixel
crop has 0.69 of the pixels but not always 0.69 of the multiply-adds: ``cifar_pool`` 240 against 313 MMAC
(0.77: its stage 4 ends at 3x3 either way), ``cifar`` 866 against 1,247 (0.69), ``imagenet`` 82 against 94 (0.86).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import keras
import tensorflow as tf
from keras import layers, ops

from fer_keras import (  # noqa: F401  FIRST_CONV_LAYER, LAST_CONV_LAYER: the layer names, also from here
    BLOCKS_PER_STAGE,
    BN_EPSILON,
    FER2013_MEAN,
    FER2013_STD,
    FIRST_CONV_LAYER,
    IMAGE_SIZE,
    LAST_CONV_LAYER,
    NUM_CLASSES,
    STAGE_WIDTHS,
    STEM_OUTPUT_LAYER,
    STEMS,
    schedules,  # noqa: F401  registers OneCycle: a run's best.keras names it in its compile config
)
from fer_keras.augment import check_input_crop

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1 in Keras' convention.
# cuDNN refuses an epsilon below 1e-5, and float32(1e-5) is just below it: TensorFlow's own fused wrapper uses this.
CUDNN_MIN_EPSILON = 1.001e-5


def _clone(initializer: keras.initializers.Initializer, offset: int = 0) -> keras.initializers.Initializer:
    """A separate initializer per sublayer, as Keras' own layers do: an unseeded Keras 3 initializer fixes
    its seed when created, so one object shared by conv1 and conv2 would give both the same kernel. A seeded
    one gives each sublayer its own seed, ``seed + offset``, for the same reason."""
    config = initializer.get_config()
    if isinstance(config.get("seed"), int):
        config["seed"] += offset
    return initializer.__class__.from_config(config)


@keras.saving.register_keras_serializable(package="fer_keras")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras BatchNormalization whose training step is one ``FusedBatchNormV3`` op.

    Keras 3 computes the batch moments and the normalisation as separate ops and, under mixed
    precision, casts the activations to float32 and back around them: several passes over every
    activation forward and more backward. The fused kernel (oneDNN's on CPU, cuDNN's on GPU) reads
    bfloat16/float16 activations directly and keeps its statistics in float32. On the project's 2-core
    CPU it trains ResNet-18 10-12 % faster in float32 and 25-34 % faster in mixed_bfloat16 (README,
    Speed), and it computes the same function: the moving variance takes the biased batch variance, as
    Keras', and only an epsilon below cuDNN's minimum is raised to it (as ``tf.nn.fused_batch_norm``
    does; 1e-5 becomes 1.001e-5, a relative change of ~1e-9 in the output).

    Inference, ``synchronized=True``, renorm, masks, float64 and anything other than 4-D channels-last
    input take Keras' own path, so the layer's weights, config and inference graph are Keras'.

    Under a distribution strategy the moving statistics are averaged over the replicas at every update
    (Keras 3 leaves each replica its own copy and saves only the first replica's): every replica then validates
    with the statistics that are saved, and a resumed run starts from what every replica had.
    """

    MOVING_STATISTICS = ("moving_mean", "moving_variance")

    def add_weight(self, *args: Any, **kwargs: Any) -> keras.Variable:
        if kwargs.get("name") in self.MOVING_STATISTICS:
            kwargs["aggregation"] = "mean"
        return super().add_weight(*args, **kwargs)

    def _fusable(self, inputs: Any, training: Any, mask: Any) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and training is True
            and self.trainable
            and mask is None
            and not self.synchronized
            and not self.renorm
            and self.center
            and self.scale
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16)
        )

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=self.gamma, offset=self.beta, mean=empty, variance=empty,
            epsilon=max(self.epsilon, CUDNN_MIN_EPSILON), data_format="NHWC", is_training=True,
        )
        # The op returns the unbiased variance (n / (n - 1)); Keras' moving variance uses the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
        variance = variance * tf.maximum(count - 1.0, 0.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return outputs


def batchnorm_class(fused: bool) -> type[layers.BatchNormalization]:
    """The BatchNorm layer the model builds: the fused one, or Keras' own (the benchmark's A/B baseline)."""
    return FusedBatchNormalization if fused else layers.BatchNormalization


@keras.saving.register_keras_serializable(package="fer_keras")
class BasicBlock(layers.Layer):
    """ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, add, ReLU.

    The shortcut is a 1x1 conv + BN when the stride or width changes, else the identity. Strided
    convolutions pad one pixel on each side (as PyTorch does) rather than Keras' asymmetric
    ``"same"``, so the 3x3 and 1x1 paths sample the same grid.
    """

    def __init__(
        self,
        filters: int,
        strides: int = 1,
        bn_momentum: float = BN_MOMENTUM,
        bn_epsilon: float = BN_EPSILON,
        kernel_initializer: Any = "he_normal",
        synchronized: bool = False,
        fused_batchnorm: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if filters <= 0 or strides not in (1, 2):
            raise ValueError(f"BasicBlock needs filters > 0 and strides 1 or 2, got {filters}, {strides}")
        self.filters = filters
        self.strides = strides
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.synchronized = synchronized
        self.fused_batchnorm = fused_batchnorm

        # Sublayers are made with the block's trainable flag: a block frozen when saved is rebuilt frozen by
        # from_config, whose trainable=False reaches only the block itself (its sublayers do not exist yet).
        def conv(k: int, s: int, name: str, padding: str, seed_offset: int) -> layers.Conv2D:
            return layers.Conv2D(
                filters, k, strides=s, padding=padding, use_bias=False,
                kernel_initializer=_clone(self.kernel_initializer, seed_offset), dtype=self.dtype_policy,
                trainable=self.trainable, name=name,
            )

        def bn(name: str, gamma: str = "ones") -> layers.BatchNormalization:
            return batchnorm_class(fused_batchnorm)(
                momentum=bn_momentum, epsilon=bn_epsilon, gamma_initializer=gamma,
                synchronized=synchronized, dtype=self.dtype_policy, trainable=self.trainable, name=name,
            )

        self.pad = layers.ZeroPadding2D(1, dtype=self.dtype_policy, name="pad") if strides > 1 else None
        self.conv1 = conv(3, strides, "conv1", "valid" if strides > 1 else "same", 0)
        self.bn1 = bn("bn1")
        self.conv2 = conv(3, 1, "conv2", "same", 1)
        self.bn2 = bn("bn2")
        self.shortcut_conv = None
        self.shortcut_bn = None
        self._needs_projection: bool | None = None

    def build(self, input_shape: tuple) -> None:
        channels = input_shape[-1]
        self._needs_projection = self.strides != 1 or channels != self.filters
        shape = tuple(input_shape)
        if self.pad is not None:
            self.pad.build(shape)
            padded = self.pad.compute_output_shape(shape)
        else:
            padded = shape
        self.conv1.build(padded)
        mid = self.conv1.compute_output_shape(padded)
        self.bn1.build(mid)
        self.conv2.build(mid)
        self.bn2.build(mid)
        if self._needs_projection:
            self.shortcut_conv = layers.Conv2D(
                self.filters, 1, strides=self.strides, use_bias=False,
                kernel_initializer=_clone(self.kernel_initializer, 2), dtype=self.dtype_policy,
                trainable=self.trainable, name="shortcut_conv",
            )
            self.shortcut_bn = batchnorm_class(self.fused_batchnorm)(
                momentum=self.bn_momentum, epsilon=self.bn_epsilon, synchronized=self.synchronized,
                dtype=self.dtype_policy, trainable=self.trainable, name="shortcut_bn",
            )
            self.shortcut_conv.build(shape)
            self.shortcut_bn.build(self.shortcut_conv.compute_output_shape(shape))
        self.built = True

    def call(self, inputs: keras.KerasTensor, training: bool | None = None) -> keras.KerasTensor:
        x = self.pad(inputs) if self.pad is not None else inputs
        x = self.conv1(x)
        x = self.bn1(x, training=training)
        x = ops.relu(x)
        x = self.conv2(x)
        x = self.bn2(x, training=training)
        if self._needs_projection:
            shortcut = self.shortcut_bn(self.shortcut_conv(inputs), training=training)
        else:
            shortcut = inputs
        return ops.relu(x + shortcut)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        def down(n):
            return None if n is None else (n - 1) // self.strides + 1

        return (input_shape[0], down(input_shape[1]), down(input_shape[2]), self.filters)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            strides=self.strides,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            synchronized=self.synchronized,
            fused_batchnorm=self.fused_batchnorm,
        )
        return config


@keras.saving.register_keras_serializable(package="fer_keras")
class GrayscaleToRGB(layers.Layer):
    """Repeats a one-channel image to three channels (no parameters)."""

    def call(self, inputs: keras.KerasTensor) -> keras.KerasTensor:
        return ops.repeat(inputs, 3, axis=-1)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape[:-1]) + (3,)


@keras.saving.register_keras_serializable(package="fer_keras")
class ReplicaDropout(layers.Dropout):
    """Dropout that draws other masks on every replica.

    Keras 3.15's Dropout keeps its random state in a variable copied to each replica, all equal, so under a
    strategy with several replicas (workers included) every replica drew the same masks at every step, each for
    its own share of the batch: with 8 replicas and batch 128, 16 distinct masks a step instead of 128. This folds
    the replica's id into the seed of each draw. On one replica it is Keras' Dropout, draw for draw, and its
    weights (the random state) are Keras' too, so checkpoints and ``--init_from`` models of either load.
    """

    def call(self, inputs, training=False):
        replica = tf.distribute.get_replica_context()
        if not training or self.rate == 0 or replica is None or replica.num_replicas_in_sync == 1:
            return super().call(inputs, training=training)
        seed = tf.random.experimental.stateless_fold_in(
            tf.cast(self.seed_generator.next(), tf.int64), tf.cast(replica.replica_id_in_sync_group, tf.int64))
        noise_shape = None
        if self.noise_shape is not None:
            noise_shape = [tf.shape(inputs)[i] if d is None else d for i, d in enumerate(self.noise_shape)]
        # Keras' TensorFlow backend folds its int64 seeds into int32 the same way.
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        return tf.nn.experimental.stateless_dropout(inputs, rate=self.rate, noise_shape=noise_shape, seed=seed)


def resnet18(
    stem: str = "cifar_pool",
    input_channels: int = 1,
    num_classes: int = NUM_CLASSES,
    dropout: float = 0.0,
    image_size: int = IMAGE_SIZE,
    mean: float = FER2013_MEAN,
    std: float = FER2013_STD,
    sync_batchnorm: bool = False,
    fused_batchnorm: bool = True,
    input_crop: int = 0,
    name: str = "resnet18",
) -> keras.Model:
    """Builds ResNet-18 whose input is raw pixels ``(image_size, image_size, 1)`` in 0-255.

    ``sync_batchnorm`` computes BatchNorm statistics over the global batch across replicas, so a
    distributed run computes what a single device with the same global batch would.
    ``fused_batchnorm=False`` uses Keras' own BatchNormalization (same function, slower training):
    the benchmark's A/B baseline. ``input_crop`` (0: none) keeps the central ``input_crop`` pixels square.

    Returns float32 logits of shape ``(N, num_classes)`` whatever the dtype policy, so that the
    loss and softmax stay exact under mixed precision.
    """
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if input_channels not in (1, 3):
        raise ValueError(f"input_channels must be 1 or 3, got {input_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    check_input_crop(input_crop, image_size)

    inputs = keras.Input((image_size, image_size, 1), name="pixels")
    x = inputs
    if input_crop:
        x = layers.Cropping2D((image_size - input_crop) // 2, name=INPUT_CROP_LAYER)(x)
    # x/255 normalised: (x/255 - mean)/std = x * 1/(255 std) - mean/std.
    x = layers.Rescaling(1.0 / (255.0 * std), offset=-mean / std, name="normalize")(x)
    if input_channels == 3:
        x = GrayscaleToRGB(name="to_rgb")(x)

    conv_kw = dict(use_bias=False, kernel_initializer="he_normal")
    if stem == "imagenet":
        x = layers.ZeroPadding2D(3, name="stem_pad")(x)
        x = layers.Conv2D(64, 7, strides=2, name="stem_conv", **conv_kw)(x)
    else:
        x = layers.Conv2D(64, 3, padding="same", name="stem_conv", **conv_kw)(x)
    x = batchnorm_class(fused_batchnorm)(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_batchnorm, name="stem_bn"
    )(x)
    x = layers.ReLU(name=STEM_OUTPUT_LAYER)(x)
    if stem == "imagenet":
        # Zero padding equals PyTorch's -inf padding here because inputs are >= 0 after ReLU.
        x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    elif stem == "cifar_pool":
        x = layers.MaxPooling2D(2, strides=2, name="stem_pool")(x)

    for stage, width in enumerate(STAGE_WIDTHS, start=1):
        for block in range(1, BLOCKS_PER_STAGE + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = BasicBlock(
                width, strides=strides, synchronized=sync_batchnorm, fused_batchnorm=fused_batchnorm,
                name=f"stage{stage}_block{block}",
            )(x)

    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout > 0:
        x = ReplicaDropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


INPUT_CROP_LAYER = "input_crop"


def input_crop_of(model: keras.Model) -> int:
    """The side of the central window ``model`` sees (its ``input_crop`` layer), or 0 when it sees it all."""
    try:
        layer = model.get_layer(INPUT_CROP_LAYER)
    except ValueError:
        return 0
    (top, bottom), _ = layer.cropping
    return int(model.input_shape[1] - top - bottom)


def count_params(model: keras.Model, trainable_only: bool = True) -> int:
    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(int(ops.size(w)) for w in weights))


def as_float32(model: keras.Model) -> keras.Model:
    """A float32 copy of a (possibly mixed-precision) functional model: the numerics of the export, so
    everything measured on a ``.keras`` file (TTA choice, evaluation, explanations) is what is served."""
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    config = model.get_config()

    def patch(layer_config: dict) -> None:
        if isinstance(layer_config, dict) and "dtype" in layer_config:
            layer_config["dtype"] = "float32"

    for layer in config["layers"]:
        patch(layer.get("config", {}))
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def output_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer that makes the model's (first) output."""
    names = getattr(model, "output_names", None)  # Keras 3 Sequential models have none
    return model.get_layer(names[0]) if names else model.layers[-1]


def as_logits(model: keras.Model) -> keras.Model:
    """The model without a final softmax, so that it outputs logits like every fer_keras model: the export, TTA,
    evaluation and distillation apply softmax themselves, and saliency needs logits, whose gradients do not
    saturate. A model without one is returned as it is; otherwise the caller's model keeps its softmax."""
    last = output_layer(model)
    if isinstance(last, layers.Softmax):
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # a list would warn at every call
        return keras.Model(inputs, last.input, name=model.name)
    if getattr(last, "activation", None) is not keras.activations.softmax:
        return model
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    output_layer(clone).activation = keras.activations.linear
    return clone


def load_keras_model(path: str, safe_mode: bool = True) -> keras.Model:
    """Loads a ``.keras`` file with Keras safe mode on (a file with a code-carrying Lambda is refused), as a
    classifier that outputs logits (:func:`as_logits`)."""
    from fer_keras.errors import ModelError

    if str(path).endswith(".keras") and os.path.isfile(path):
        try:  # zipfile.is_zipfile answers False for a file it cannot read
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ModelError(f"{path}: cannot read model: {e.strerror or e}") from None
        if not zipfile.is_zipfile(path):
            # Keras says "File not found" of a file that is there but is no archive.
            raise ModelError(f"{path}: cannot load model: not a .keras file (a zip archive); is it truncated or "
                             "renamed?")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=safe_mode)
    except ValueError as e:
        msg = str(e)
        if "safe_mode" in msg or "Lambda" in msg or "unsafe" in msg.lower():
            raise ModelError(
                f"{path}: refused: the file contains arbitrary code (a Lambda layer); "
                "load it only if you trust its source"
            ) from None
        raise ModelError(f"{path}: cannot load model: {msg.splitlines()[0][:200]}") from None
    except (OSError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ModelError(f"{path}: cannot load model: {reason}") from None
    check_classifier(model, path)
    return as_logits(model)


def check_classifier(model: keras.Model, where: str | os.PathLike) -> None:
    """Refuses a model that does not map ``[N, 48, 48, 1]`` pixels to 7 logits: its outputs would be misread
    (an export regroups them into rows of 7, so 7 images could come back as 10 predictions)."""
    from fer_keras.errors import ModelError

    inputs, outputs = getattr(model, "input_shape", None), getattr(model, "output_shape", None)
    if not (isinstance(inputs, tuple) and tuple(inputs[1:]) == (IMAGE_SIZE, IMAGE_SIZE, 1)):
        raise ModelError(f"{where}: the model takes input of shape {inputs}, not [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1] "
                         "grayscale pixels")
    if not (isinstance(outputs, tuple) and len(outputs) == 2 and outputs[-1] == NUM_CLASSES):
        raise ModelError(f"{where}: the model outputs shape {outputs}, not [N, {NUM_CLASSES}] logits (one per "
                         "FER2013 class)")
