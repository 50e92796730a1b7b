"""ResNet-18 structure, parameter counts and serialisation."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import distinct_batchnorm

from fer_keras import BN_EPSILON, FER2013_MEAN, FER2013_STD
from fer_keras.errors import ModelError
from fer_keras.model import (
    BasicBlock,
    FusedBatchNormalization,
    GrayscaleToRGB,
    as_logits,
    count_params,
    input_crop_of,
    load_keras_model,
    resnet18,
)


@pytest.mark.parametrize(
    "stem, channels, expected",
    [("imagenet", 3, 11_180_103), ("imagenet", 1, 11_173_831)],
)
def test_parameter_count_equals_torchvision(stem, channels, expected):
    assert count_params(resnet18(stem, channels)) == expected


def test_layer_names_read_like_the_architecture():
    names = [layer.name for layer in resnet18("imagenet", dropout=0.2).layers]
    expected = ["stem_conv", "stem_bn", "stem_pool"] + [
        f"stage{s}_block{b}" for s in range(1, 5) for b in (1, 2)
    ] + ["avg_pool", "dropout", "logits"]
    positions = [names.index(n) for n in expected]
    assert positions == sorted(positions)


@pytest.mark.parametrize("stem, before_stage1", [("imagenet", 12), ("cifar_pool", 24), ("cifar", 48)])
def test_stems_set_the_resolution_of_stage1(stem, before_stage1):
    model = resnet18(stem)
    assert model.get_layer("stage1_block1").output.shape[1] == before_stage1
    assert model.get_layer("stage4_block2").output.shape[1:] == (
        -(-before_stage1 // 8), -(-before_stage1 // 8), 512)


@pytest.mark.parametrize("stem", ["imagenet", "cifar_pool", "cifar"])
def test_stem_matches_reference_computation(stem):
    """torchvision's Normalize then the stem as the PyTorch twin builds it, recomputed with plain ops: imagenet's
    7x7/2 conv pads 3 on every side and its 3x3/2 max-pool 1, the cifar stems' 3x3/1 conv 1, cifar_pool's 2x2/2
    max-pool none. Runs where torch is not installed (the twin's own comparison skips there)."""
    model = resnet18(stem)
    distinct_batchnorm(model)
    x = np.random.default_rng(6).integers(0, 256, (2, 48, 48, 1)).astype("float32")
    last = "stem_relu" if stem == "cifar" else "stem_pool"
    got = np.asarray(keras.Model(model.input, model.get_layer(last).output)(x, training=False))

    conv_layer, bn = model.get_layer("stem_conv"), model.get_layer("stem_bn")
    v = (x / 255.0 - FER2013_MEAN) / FER2013_STD
    pad, stride = (3, 2) if stem == "imagenet" else (1, 1)
    v = np.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    v = np.asarray(keras.ops.conv(v, conv_layer.kernel, strides=stride, padding="valid"))
    v = (v - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + BN_EPSILON) * bn.gamma.numpy() \
        + bn.beta.numpy()
    v = np.maximum(v, 0)
    if stem != "cifar":
        size, pad = (3, 1) if stem == "imagenet" else (2, 0)
        v = np.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # zeros act as -inf: v >= 0 after the ReLU
        windows = np.lib.stride_tricks.sliding_window_view(v, (size, size), axis=(1, 2))[:, ::2, ::2]
        v = windows.max(axis=(-2, -1))
    assert got.shape == v.shape == (2, *{"imagenet": (12, 12), "cifar_pool": (24, 24), "cifar": (48, 48)}[stem], 64)
    np.testing.assert_allclose(got, v, rtol=1e-4, atol=1e-4 * np.abs(v).max())


def test_shortcut_projection_only_where_shape_changes():
    model = resnet18("imagenet")
    for stage in range(1, 5):
        for block in (1, 2):
            layer = model.get_layer(f"stage{stage}_block{block}")
            projected = layer.shortcut_conv is not None
            assert projected == (stage > 1 and block == 1), layer.name


def test_block_config_round_trip():
    """Every argument away from its default, so that one missing from get_config comes back as the default (a
    .keras reload of a block with another epsilon would compute something else)."""
    block = BasicBlock(128, strides=2, bn_momentum=0.8, bn_epsilon=1e-3, kernel_initializer="glorot_uniform",
                       synchronized=True, fused_batchnorm=False, name="b")
    config = block.get_config()
    clone = BasicBlock.from_config(config)
    assert clone.get_config() == config
    assert (clone.filters, clone.strides, clone.bn_momentum, clone.bn_epsilon, clone.synchronized,
            clone.fused_batchnorm) == (128, 2, 0.8, 1e-3, True, False)
    assert isinstance(clone.kernel_initializer, keras.initializers.GlorotUniform)
    clone.build((None, 8, 8, 64))
    for bn in (clone.bn1, clone.bn2, clone.shortcut_bn):
        assert (bn.momentum, bn.epsilon, bn.synchronized) == (0.8, 1e-3, True), bn.name


def test_every_batchnorm_is_pytorchs():
    """momentum 0.1 in PyTorch's convention (0.9 in Keras') and eps 1e-5, in the stem and in every block; Keras'
    own defaults are 0.99 and 1e-3."""
    layers_ = resnet18("imagenet")._flatten_layers()
    bns = [layer for layer in layers_ if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 20
    assert {(bn.momentum, bn.epsilon) for bn in bns} == {(0.9, BN_EPSILON)}


@pytest.mark.parametrize("strides, channels, projected", [(2, 4, True), (1, 4, True), (1, 8, False)])
def test_block_matches_reference_computation(strides, channels, projected):
    """conv-BN-ReLU-conv-BN + shortcut, add, ReLU: recomputed with plain ops. The shortcut is projected (1x1 conv +
    BN) when the stride or the width changes, else the identity."""
    block = BasicBlock(8, strides=strides)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, channels)).astype("float32")
    block.build(x.shape)
    assert distinct_batchnorm(block) == (12 if projected else 8)  # 4 per BatchNorm: bn1, bn2 (, shortcut_bn)
    assert (block.shortcut_conv is not None) == projected
    y = np.asarray(block(x, training=False))

    def conv(layer, v, pad):
        v = np.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return np.asarray(keras.ops.conv(v, layer.kernel, strides=layer.strides, padding="valid"))

    def bn(layer, v):
        return (v - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon) \
            * layer.gamma.numpy() + layer.beta.numpy()

    h = np.maximum(bn(block.bn1, conv(block.conv1, x, 1)), 0)
    h = bn(block.bn2, conv(block.conv2, h, 1))
    s = bn(block.shortcut_bn, conv(block.shortcut_conv, x, 0)) if projected else x
    np.testing.assert_allclose(y, np.maximum(h + s, 0), atol=1e-5)
    side = 6 // strides
    assert y.shape == (2, side, side, 8) == block.compute_output_shape(x.shape)


def test_model_config_round_trip():
    model = resnet18("cifar_pool", 3, dropout=0.3)
    config = model.get_config()
    clone = type(model).from_config(copy.deepcopy(config))  # from_config consumes its argument
    assert clone.get_config() == config
    assert count_params(clone) == count_params(model)


def test_keras_file_round_trip_gives_identical_predictions(tmp_path):
    model = resnet18("imagenet", dropout=0.2)
    x = np.random.default_rng(1).integers(0, 256, (4, 48, 48, 1)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = load_keras_model(str(path))
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_uint8_and_float_pixels_agree_and_rgb_is_repeated_grey():
    model = resnet18("imagenet", 3)
    x = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 1)).astype("uint8")
    np.testing.assert_allclose(model(x), model(x.astype("float32")), atol=1e-6)
    rgb = GrayscaleToRGB()(x.astype("float32"))
    assert rgb.shape == (2, 48, 48, 3)
    np.testing.assert_array_equal(np.asarray(rgb)[..., 2], x[..., 0])


def test_logits_stay_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = resnet18("imagenet")
        assert model.get_layer("stage2_block1").compute_dtype == "bfloat16"
        assert model(np.zeros((1, 48, 48, 1), "float32")).dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous)


def test_input_crop_sees_only_the_central_window_and_round_trips(tmp_path):
    model = resnet18("imagenet", input_crop=40)
    assert model.layers[1].name == "input_crop" and input_crop_of(model) == 40 and input_crop_of(resnet18()) == 0
    assert count_params(model) == count_params(resnet18("imagenet"))
    x = np.random.default_rng(3).integers(0, 256, (2, 48, 48, 1)).astype("float32")
    border = x.copy()
    border[:, :4] = 0
    border[:, :, 44:] = 255
    inside = x.copy()
    inside[:, 4, 4] = 255 - inside[:, 4, 4]
    np.testing.assert_array_equal(model(x), model(border))
    assert not np.allclose(model(x), model(inside), rtol=1e-4, atol=1e-4)
    model.save(tmp_path / "crop.keras")
    loaded = load_keras_model(str(tmp_path / "crop.keras"))
    assert input_crop_of(loaded) == 40
    np.testing.assert_array_equal(model(x), loaded(x))


@pytest.mark.parametrize("crop", [41, 48, 50, -2])
def test_a_crop_that_is_not_a_centred_window_is_refused(crop):
    with pytest.raises(ValueError, match=f"input_crop must be .* got {crop}"):
        resnet18("imagenet", input_crop=crop)


@pytest.mark.parametrize("kwargs", [{"stem": "vgg"}, {"input_channels": 2}, {"dropout": 1.0}])
def test_bad_arguments_are_refused_with_the_value(kwargs):
    with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
        resnet18(**kwargs)


def test_safe_mode_refuses_a_lambda_with_code(tmp_path):
    inputs = keras.Input((48, 48, 1))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelError, match="arbitrary code"):
        load_keras_model(str(path))


@pytest.mark.parametrize("head", ["activation", "Softmax"])
def test_a_classifier_saved_with_a_final_softmax_loads_as_logits(tmp_path, head):
    """fer_keras applies softmax itself (export, TTA, evaluation, distillation): a model ending in one is loaded
    without it, or its probabilities would be softmaxed twice."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    logits = keras.layers.Dense(7, name="logits")(x)
    if head == "activation":
        saved = keras.Model(inputs, keras.layers.Dense(7, activation="softmax", name="probs")(x))
        saved.get_layer("probs").set_weights(keras.Model(inputs, logits).get_layer("logits").get_weights())
    else:
        saved = keras.Model(inputs, keras.layers.Softmax()(logits))
    saved.save(tmp_path / "softmax.keras")
    loaded = load_keras_model(str(tmp_path / "softmax.keras"))
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 48, 48, 1)).astype(np.float32)
    expected = np.asarray(keras.Model(inputs, logits)(pixels))
    np.testing.assert_allclose(np.asarray(loaded(pixels)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(saved(pixels)).sum(axis=1), 1.0, rtol=1e-5)
    plain = resnet18("imagenet")
    assert as_logits(plain) is plain


def test_a_keras_file_with_a_damaged_member_is_a_one_line_error(tmp_path):
    """A flipped byte inside the zip's weights member: zipfile reports a bad CRC (BadZipFile), not a traceback."""
    import zipfile

    inputs = keras.Input((4,))
    path = tmp_path / "damaged.keras"
    keras.Model(inputs, keras.layers.Dense(3, name="logits")(inputs)).save(path)
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("model.weights.h5")
    assert member.compress_type == zipfile.ZIP_STORED  # so the flipped byte is data, not compressed stream
    raw = bytearray(path.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    raw[start + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match=r"damaged.keras: cannot load model: .*CRC"):
        load_keras_model(str(path))


def test_a_keras_file_that_cannot_be_read_is_named_as_unreadable(tmp_path, monkeypatch):
    """zipfile.is_zipfile answers False for a file it cannot open, so a permission problem was reported as "not a
    .keras file; is it truncated or renamed?". The refusal is simulated (this suite runs as root, which reads any
    file)."""
    import builtins

    path = tmp_path / "locked.keras"
    path.write_bytes(b"PK\x03\x04")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(ModelError, match=r"^\S*locked.keras: cannot read model: Permission denied$"):
        load_keras_model(str(path))


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_no_two_convolutions_start_with_the_same_kernel(stem):
    model = resnet18(stem)
    kernels = [(v.path, np.asarray(v)) for v in model.weights if v.path.endswith("/kernel") and len(v.shape) == 4]
    assert len(kernels) == 20  # stem + 16 block convs + 3 shortcuts
    for i, (name_a, a) in enumerate(kernels):
        for name_b, b in kernels[i + 1:]:
            assert a.shape != b.shape or not np.array_equal(a, b), f"{name_a} and {name_b} start identical"


def test_a_seeded_initializer_gives_each_convolution_of_a_block_its_own_kernel():
    """_clone copied the seed too: conv1 and conv2 of a block given HeNormal(seed=1) started identical. The same
    seed still gives the same block."""
    def kernels(seed: int) -> list[np.ndarray]:
        block = BasicBlock(8, strides=2, kernel_initializer=keras.initializers.HeNormal(seed=seed))
        block.build((None, 6, 6, 8))
        return [np.asarray(layer.kernel) for layer in (block.conv1, block.conv2, block.shortcut_conv)]

    first = kernels(1)
    assert not np.array_equal(first[0], first[1])
    assert [k.shape for k in first] == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 1, 8, 8)]
    assert all(np.array_equal(a, b) for a, b in zip(first, kernels(1)))
    assert not np.array_equal(first[0], kernels(2)[0])


def test_a_frozen_block_stays_frozen_through_saving(tmp_path):
    """from_config's trainable=False reached the block, not the layers inside it: a reloaded model trained its
    frozen blocks' weights and moved their BatchNorm statistics (15 trainable weights more here)."""
    model = resnet18("imagenet")
    for name in ("stage1_block1", "stage2_block1"):  # stage2_block1 has a shortcut, made in build()
        model.get_layer(name).trainable = False
    model.save(tmp_path / "m.keras")
    loaded = load_keras_model(str(tmp_path / "m.keras"))
    assert len(loaded.trainable_weights) == len(model.trainable_weights)
    block = loaded.get_layer("stage2_block1")
    assert not any(layer.trainable for layer in (block.conv1, block.bn1, block.bn2, block.shortcut_bn))
    before = np.asarray(block.bn1.moving_mean).copy()
    loaded(np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 1)).astype("float32"), training=True)
    np.testing.assert_array_equal(np.asarray(block.bn1.moving_mean), before)
    block.trainable = True  # and thawed again, it trains as a whole
    assert block.bn1.trainable and block.shortcut_conv.trainable


def _bn_pair(dtype: str, **kwargs) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """Keras' BatchNormalization and the fused one, same non-trivial weights and statistics."""
    rng = np.random.default_rng(3)
    layers_ = []
    for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = cls(momentum=0.8, epsilon=1e-5, dtype=dtype, **kwargs)
        layer.build((None, 5, 5, 6))
        layers_.append(layer)
    values = [rng.normal(size=6), rng.normal(size=6), rng.normal(size=6), rng.uniform(0.5, 2, size=6)]
    for layer in layers_:
        for var, value in zip((layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance), values):
            var.assign(value.astype("float32"))
    return layers_[0], layers_[1]


def _train_step(layer, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
    return [tf.cast(t, tf.float32) for t in (y, dx, dgamma, dbeta, layer.moving_mean, layer.moving_variance)]


@pytest.mark.parametrize("dtype, atol", [("float32", 2e-6), ("mixed_bfloat16", 1e-2)])
@pytest.mark.parametrize("graph", [False, True])
def test_fused_batchnorm_trains_as_keras_batchnorm(dtype, atol, graph):
    """Same outputs, input/gamma/beta gradients and moving statistics as Keras' layer, eager and in a
    tf.function, in float32 and in bfloat16 (whose tolerance is one rounding step of its 8-bit mantissa)."""
    keras_bn, fused_bn = _bn_pair(dtype)
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(2.0, 3.0, size=(8, 5, 5, 6)), tf.bfloat16 if "bfloat16" in dtype else tf.float32)
    upstream = tf.constant(rng.normal(size=(8, 5, 5, 6)), tf.float32)
    step = (lambda layer: tf.function(lambda: _train_step(layer, x, upstream))()) if graph else (
        lambda layer: _train_step(layer, x, upstream))
    names = ("output", "d input", "d gamma", "d beta", "moving mean", "moving variance")
    for name, want, got in zip(names, step(keras_bn), step(fused_bn)):
        want, got = np.asarray(want), np.asarray(got)
        np.testing.assert_allclose(got, want, atol=atol * max(1.0, np.abs(want).max()), err_msg=name)
    # The moving variance moved (biased batch variance, as Keras), so the check above is not vacuous.
    assert np.abs(fused_bn.moving_variance.numpy() - _bn_pair(dtype)[1].moving_variance.numpy()).max() > 0.1
    assert fused_bn(x, training=True).dtype == x.dtype


def test_fused_batchnorm_uses_one_fused_op_only_when_training():
    _, fused_bn = _bn_pair("float32")
    x = tf.zeros((2, 5, 5, 6))

    def op_types(training):
        graph = tf.function(lambda: fused_bn(x, training=training)).get_concrete_function().graph
        return {op.type for op in graph.get_operations()}

    assert "FusedBatchNormV3" in op_types(True)
    assert "FusedBatchNormV3" not in op_types(False)  # inference is Keras' own graph


@pytest.mark.parametrize("kwargs, shape", [({"synchronized": True}, (2, 5, 5, 6)), ({}, (2, 6))])
def test_fused_batchnorm_falls_back_to_keras_where_it_cannot_fuse(kwargs, shape):
    keras_bn, fused_bn = (cls(**kwargs) for cls in (keras.layers.BatchNormalization, FusedBatchNormalization))
    x = np.random.default_rng(5).normal(size=shape).astype("float32")
    np.testing.assert_allclose(fused_bn(x, training=True), keras_bn(x, training=True), atol=1e-5)
    np.testing.assert_allclose(fused_bn.moving_variance, keras_bn.moving_variance, atol=1e-6)


def test_resnet18_uses_fused_batchnorm_and_round_trips_it():
    model = resnet18("imagenet")
    bns = [w for w in model.weights if w.path.endswith("/gamma")]
    assert len(bns) == 20  # stem + 2 per block + 3 projection shortcuts
    assert isinstance(model.get_layer("stem_bn"), FusedBatchNormalization)
    assert isinstance(model.get_layer("stage2_block1").shortcut_bn, FusedBatchNormalization)
    clone = FusedBatchNormalization.from_config(model.get_layer("stem_bn").get_config())
    assert isinstance(clone, FusedBatchNormalization) and clone.epsilon == 1e-5
    plain = resnet18("imagenet", fused_batchnorm=False)
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in plain._flatten_layers())
    assert [w.path for w in plain.weights] == [w.path for w in model.weights]  # checkpoints interchange
    block = BasicBlock(8, fused_batchnorm=False)
    assert BasicBlock.from_config(block.get_config()).fused_batchnorm is False
