"""Tests of fer_keras.precise_bn (BatchNorm statistics re-estimated after training) and evaluate --precise_bn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_tool
from test_evaluate import level_model, write_challenge_csv

from fer_keras import IMAGE_SIZE
from fer_keras.errors import ConfigError, DataError, ModelError
from fer_keras.precise_bn import batchnorm_layers, reestimate


def conv_bn_model(fused: bool):
    """Pixels -> a fixed 3x3 convolution (4 channels) -> BatchNorm -> 7 logits; the conv output is known."""
    import keras

    from fer_keras.model import batchnorm_class

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="pixels")
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")
    x = conv(keras.layers.Rescaling(1.0 / 255.0)(inputs))
    x = batchnorm_class(fused)(momentum=0.9, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(7, name="logits")(x))
    conv.set_weights([np.random.default_rng(1).normal(size=(3, 3, 1, 4)).astype(np.float32),
                      np.array([0.0, 1.0, -2.0, 0.5], np.float32)])
    return model, keras.Model(inputs, conv.output)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "keras"])
def test_statistics_are_the_size_weighted_averages_of_the_batches(fused):
    """10 images in batches of 4, 4 and 2: the mean is the data's, the variance the batches' weighted by size."""
    images = np.random.default_rng(0).integers(0, 256, (10, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.uint8)
    model, features = conv_bn_model(fused)
    bn = model.get_layer("bn")
    assert reestimate(model, images, batch_size=4) == 1
    out = np.asarray(features(images.astype(np.float32)), np.float64)
    batches = [out[0:4], out[4:8], out[8:10]]
    variance = sum(len(b) * b.var(axis=(0, 1, 2)) for b in batches) / 10
    np.testing.assert_allclose(bn.moving_mean.numpy(), out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), variance, rtol=1e-4)
    assert bn.momentum == 0.9  # restored


def test_resnet18_with_one_batch_infers_as_it_trains():
    """After re-estimating on one batch, every BatchNorm of ResNet-18 (the blocks' nested ones included) holds that
    batch's statistics, so inference reproduces training mode's output on it."""
    from fer_keras.model import resnet18

    model = resnet18("cifar_pool")
    images = np.random.default_rng(2).integers(0, 256, (16, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    assert reestimate(model, images, batch_size=16) == len(batchnorm_layers(model)) == 20
    np.testing.assert_allclose(np.asarray(model(images, training=False)), np.asarray(model(images, training=True)),
                               rtol=1e-3, atol=1e-3)


def test_refusals():
    import keras

    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    plain = keras.Model(inputs, keras.layers.Dense(7)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ModelError, match="plain: has no BatchNormalization layer"):
        reestimate(plain, images, name="plain")
    model, _ = conv_bn_model(True)
    with pytest.raises(DataError, match="no images"):
        reestimate(model, images[:0])
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        reestimate(model, images, batch_size=0)
    model.get_layer("bn").trainable = False
    with pytest.raises(ModelError, match="frozen BatchNorm"):
        reestimate(model, images)


@pytest.fixture(scope="module")
def bn_setup(tmp_path_factory):
    """The conv-BN model as .keras and as an export with flip built in, and a challenge CSV for it."""
    from fer_keras.export import export_model

    root = tmp_path_factory.mktemp("precise_bn")
    rows = [(k % 7, k % 7, "PublicTest") for k in range(14)] + [(k, (k + 3) % 7, "Training") for k in range(7)]
    csv_path = write_challenge_csv(root / "fer2013.csv", rows)
    model, _ = conv_bn_model(True)
    model.save(root / "bn.keras")
    export = export_model(model, root / "exports", name="bn_flip", tta="flip")
    level_model().save(root / "no_bn.keras")
    return {"csv": csv_path, "keras": root / "bn.keras", "export": export, "no_bn": root / "no_bn.keras"}


def test_cli_evaluates_an_exports_network_with_the_views_asked_for(bn_setup, tmp_path):
    from fer_keras import data as fer_data
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import Predictor, load_keras

    out = tmp_path / "reports"
    proc = run_tool("evaluate", f"--model={bn_setup['export']}", f"--data={bn_setup['csv']}", "--precise_bn",
                    "--tta=tencrop", f"--output_dir={out}", "--batch_size=4")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads((out / "val_tta-tencrop_precise-bn_metrics.json").read_text())
    assert payload["tta"] == "tencrop" and payload["export_tta"] == "flip" and payload["model_kind"] == "saved_model"
    assert payload["batchnorm_statistics"] == "re-estimated on 7 images of train (Training), unaugmented"
    assert ("its network alone, without the flip views the export averages; BatchNorm statistics re-estimated on "
            "7 images") in proc.stdout
    # The same figures by hand: the rebuilt model, its statistics from the Training rows, flip.
    data = fer_data.load(bn_setup["csv"])
    model = load_keras(bn_setup["export"])
    before = model.get_layer("bn").moving_mean.numpy().copy()
    reestimate(model, data.split("train").images, batch_size=4)
    assert not np.allclose(before, model.get_layer("bn").moving_mean.numpy())
    expected = evaluate(Predictor("keras", bn_setup["export"], keras_model=model), data.split("val"), "tencrop",
                        split_name="val", batch_size=4)
    assert payload["confusion_counts"] == expected.confusion.tolist()
    assert payload["num_correct"] == expected.num_correct
    # Without the flag the export's own statistics serve, and the files keep their names.
    plain = run_tool("evaluate", f"--model={bn_setup['export']}", f"--data={bn_setup['csv']}",
                     f"--output_dir={out}", "--batch_size=4")
    assert plain.returncode == 0, plain.stderr
    assert json.loads((out / "val_metrics.json").read_text())["batchnorm_statistics"] == \
        "the moving averages of training"


@pytest.mark.parametrize("args, message", [
    (["--data=PUBLIC_ONLY"], "has no 'train' split"),
    (["--model=NO_BN"], "has no BatchNormalization layer to re-estimate"),
])
def test_cli_refusals_are_one_line(bn_setup, tmp_path, args, message):
    public_only = write_challenge_csv(tmp_path / "public.csv", [(k, k, "PublicTest") for k in range(7)])
    args = [a.replace("PUBLIC_ONLY", str(public_only)).replace("NO_BN", str(bn_setup["no_bn"])) for a in args]
    proc = run_tool("evaluate", f"--model={bn_setup['export']}", f"--data={bn_setup['csv']}", "--precise_bn",
                    f"--output_dir={tmp_path / 'out'}", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
