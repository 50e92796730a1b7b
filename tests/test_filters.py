"""Filter visualisation on models whose answer is known, and the ``python -m fer_keras.filters`` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_tool
from PIL import Image

from fer_keras import data as fer_data
from fer_keras import filters as flt
from fer_keras.errors import ConfigError
from fer_keras.history import check_json_replaceable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def zero_mean_conv_model() -> keras.Model:
    """Two small ReLU convs with zero-mean kernels, so random images give a modest activation."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv2")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    for name in ("conv1", "conv2"):
        kernel, bias = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([kernel - kernel.mean(axis=(0, 1, 2), keepdims=True), bias])
    return model


def brightness_model() -> keras.Model:
    """Filter 0 sums 3x3 pixels (brightness), filter 1 is its negative (darkness)."""
    inputs = keras.Input((48, 48, 1))
    conv = keras.layers.Conv2D(2, 3, use_bias=False, name="bright")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    kernel = np.ones((3, 3, 1, 2), np.float32)
    kernel[..., 1] = -1.0
    conv.set_weights([kernel])
    return model


def patch_model() -> keras.Model:
    """Filter 0 fires where a 9x9 patch is bright (mean pixel above 0.7 x 255), which uniform noise never gives (its
    patch means have a spread of 0.032 x 255 about 0.5 x 255: p < 1e-9 per position); filter 1 has all-zero weights
    (dead); filter 2 is brightness after ReLU."""
    inputs = keras.Input((48, 48, 1))
    conv = keras.layers.Conv2D(3, 9, activation="relu", name="patch")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(conv(keras.layers.Rescaling(1 / 255)(inputs))))
    kernel = np.zeros((9, 9, 1, 3), np.float32)
    kernel[..., 0] = kernel[..., 2] = 1 / 81
    conv.set_weights([kernel, np.array([-0.7, 0.0, 0.0], np.float32)])
    return model


def grey_square(size: int = 24, value: int = 200) -> np.ndarray:
    image = np.zeros((48, 48, 1), np.uint8)
    image[12:12 + size, 12:12 + size] = value
    return image


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()


# --------------------------------------------------------------------------------------------
# Activation maximisation


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_maximization_beats_random_inputs(layer):
    model = zero_mean_conv_model()
    filters = [0, 1, 2, 3]
    result = flt.maximize_filters(model, layer, filters, steps=30, seed=0)
    assert result.images.shape == (4, 48, 48, 1)
    assert result.images.min() >= 0.0 and result.images.max() <= 255.0
    sub = flt.filter_model(model, layer)
    rng = np.random.default_rng(1)
    random_images = rng.uniform(0, 255, (32, 48, 48, 1)).astype(np.float32)
    random_mean = flt.channel_means(sub, random_images, filters).mean(axis=0)
    reached = flt.channel_means(sub, result.images, filters)[np.arange(4), np.arange(4)]
    np.testing.assert_allclose(reached, result.activations, rtol=1e-5)
    assert np.all(random_mean > 0)
    assert np.all(reached >= 2.0 * random_mean), (reached, random_mean)


def test_a_filter_that_prefers_black_gets_a_black_image_not_nan():
    """The clipping drives a darkness filter's input to exactly 0, where tf-keras-vis' ``Norm`` (``tf.norm``) has a
    0/0 gradient: its images came out NaN. The RMS regulariser keeps them finite."""
    model = brightness_model()
    result = flt.maximize_filters(model, "bright", [0, 1], steps=64, seed=0)
    assert np.isfinite(result.images).all() and np.isfinite(result.activations).all()
    assert result.images[1].max() == 0.0 and result.activations[1] == 0.0
    assert result.images[0].min() > 200.0 and result.activations[0] > 9 * 200.0


def test_a_filter_noise_never_switches_on_starts_from_its_natural_image():
    """Noise gives a ReLU filter that it never switches on no gradient: from noise it stays at 0, which the figure
    used to present as its maximising input. From an image that switches it on, it grows; a filter constant on both
    is dead, and its image is left as it started. Filters out of order, each row its own start: rows, not filter
    indices, pick the starts."""
    model = patch_model()
    blank = np.zeros((48, 48, 1), np.uint8)
    starts = np.stack([blank, grey_square(), grey_square(16)])
    result = flt.maximize_filters(model, "patch", [2, 0, 1], steps=32, seed=0, natural_starts=starts)
    assert result.status == ["maximised", "maximised", "dead"]
    np.testing.assert_array_equal(result.from_image, [False, True, False])
    sub = flt.filter_model(model, "patch")
    on_square = flt.channel_means(sub, starts[1:2], [0])[0, 0]
    np.testing.assert_allclose(result.start_activations[1], on_square, rtol=1e-5)
    assert on_square > 0 and result.activations[1] > 10 * on_square
    assert result.activations[2] == 0.0 and result.random_mean[1] == 0.0
    assert 60 < result.images[2].std() < 85  # a dead filter's image is its uniform-noise start (std 73.6), not moved
    alone = flt.maximize_filters(model, "patch", [0, 1], steps=32, seed=0)
    assert alone.status == ["not maximised", "not maximised"] and alone.activations[0] == 0.0
    assert not alone.from_image.any()
    with pytest.raises(ValueError, match="natural_starts has shape"):
        flt.maximize_filters(model, "patch", [0], steps=1, natural_starts=starts)


def test_a_filter_on_a_one_by_one_map_that_its_start_switches_on_is_not_dead():
    """A 1x1 map cannot vary over the image: a filter is alive when its start moves it off its constant on noise."""
    inputs = keras.Input((48, 48, 1))
    conv = keras.layers.Conv2D(1, 48, activation="relu", name="whole")
    model = keras.Model(inputs, conv(keras.layers.Rescaling(1 / 255)(inputs)))
    conv.set_weights([np.full((48, 48, 1, 1), 1 / 48**2, np.float32), np.array([-0.7], np.float32)])
    result = flt.maximize_filters(model, "whole", [0], steps=16, seed=0,
                                  natural_starts=np.full((1, 48, 48, 1), 200, np.uint8))
    assert result.status == ["maximised"] and result.from_image[0]
    assert result.activations[0] > 3 * result.start_activations[0] > 0


def test_the_figure_and_summary_name_dead_and_unmoved_filters():
    model = patch_model()
    images = np.stack([grey_square(16), grey_square(24), np.zeros((48, 48, 1), np.uint8)])
    split = fer_data.Split(images, np.array([3, 4, 5]), np.array(["a", "b", "c"]))
    entry, figures = flt.analyse_layer(model, "patch", [0, 1, 2], split, images[0], "#0", Path("out"), top_k=2,
                                       steps=16, seed=0)
    rows = entry["filters"]
    assert [r["status"] for r in rows] == ["maximised", "dead", "maximised"]
    assert rows[0]["start"] == {"index": 1, "id": "b"} and rows[1]["start"] == rows[2]["start"] == "noise"
    assert rows[0]["start_activation"] == pytest.approx(rows[0]["top_k"][0]["activation"], rel=1e-5)
    assert flt.summarise_layer(entry) == (
        f"3 filters, activation reached {min(rows[0]['max_activation'], rows[2]['max_activation']):.3g}-"
        f"{max(rows[0]['max_activation'], rows[2]['max_activation']):.3g}; 1 started from its top image, as noise "
        "did not move it; 1 dead (constant on noise and on the top image)")
    result = flt.maximize_filters(model, "patch", [0, 1, 2], steps=1, seed=0)
    captions = [flt._maximization_caption(f, result, j) for j, f in enumerate(result.filters)]
    assert captions[0] == ("filter 0: not maximised\n0 (random 0)", "tab:red")
    assert captions[2][1] == "black" and captions[2][0].startswith("filter 2\n")
    result.status[1] = "dead"
    assert flt._maximization_caption(1, result, 1) == ("filter 1\ndead: 0 everywhere", "tab:red")
    for png in figures.values():
        assert png[:8] == PNG_MAGIC


@pytest.mark.parametrize("modifier", [{"rotate": 10.0}, {"jitter": 4}])
def test_rotation_and_jitter_are_reproducible_by_seed(modifier):
    """tf-keras-vis' Rotate2D draws its angles from a generator seeded by the OS, its Jitter its shifts from numpy's
    global one; ours are seeded by ``seed``, so a library call is reproducible without seeding numpy."""
    model = zero_mean_conv_model()
    runs = [flt.maximize_filters(model, "conv1", [0, 1], steps=8, seed=seed, **modifier).images for seed in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_rms_norm_is_tf_keras_vis_norm_away_from_zero():
    from tf_keras_vis.activation_maximization.regularizers import Norm

    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (3, 48, 48, 1)).astype(np.float32))
    np.testing.assert_allclose(flt.RmsNorm(0.5)(x).numpy(), Norm(0.5, p=2)(x).numpy(), rtol=1e-5)


def test_progress_callback_reports_every_batch(capsys):
    model = zero_mean_conv_model()
    flt.maximize_filters(model, "conv1", [0, 1, 2], steps=4, batch_size=2, seed=0,
                         progress=lambda label: flt.StderrProgress(label, every=2))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["conv1 filters 0-1"] * 2 + ["conv1 filter 2"] * 2
    assert lines[-1].startswith("conv1 filter 2: step 4/4, score ")


def test_filter_score_picks_each_samples_filter():
    output = tf.constant(np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3))
    means = output.numpy().mean(axis=(1, 2))
    score = flt.FilterScore([2, 0], scale=[1.0, 2.0])(output).numpy()
    np.testing.assert_allclose(score, [means[0, 2], means[1, 0] / 2.0])


def test_bad_layer_and_filter_are_config_errors():
    model = zero_mean_conv_model()
    with pytest.raises(ConfigError, match="filter 4 is out of range of layer 'conv1', which has 4 filters"):
        flt.maximize_filters(model, "conv1", [0, 4], steps=1)
    with pytest.raises(ConfigError, match="no layer 'conv9'"):
        flt.top_k_images(model, "conv9", np.zeros((1, 48, 48, 1)), [0], 1)


# --------------------------------------------------------------------------------------------
# Feature maps and top-k


def test_top_k_are_the_brightest_and_darkest_images():
    rng = np.random.default_rng(5)
    brightness = rng.permutation(np.linspace(10, 240, 12))
    images = np.clip(brightness[:, None, None, None] + rng.normal(0, 3, (12, 48, 48, 1)), 0, 255).astype(np.uint8)
    indices, values = flt.top_k_images(brightness_model(), "bright", images, [0, 1], k=3)
    assert indices.shape == values.shape == (2, 3)
    np.testing.assert_array_equal(indices[0], np.argsort(-brightness)[:3])
    np.testing.assert_array_equal(indices[1], np.argsort(brightness)[:3])
    assert np.all(np.diff(values, axis=1) <= 0)  # strongest first
    np.testing.assert_allclose(values[0, 0], 9 * images[indices[0, 0]].mean(), rtol=0.02)


def test_feature_maps_of_a_constant_image():
    image = np.full((48, 48, 1), 10, np.uint8)
    maps = flt.feature_maps(brightness_model(), "bright", image, [1, 0])
    assert maps.shape == (2, 46, 46)
    np.testing.assert_allclose(maps[0], -90.0)
    np.testing.assert_allclose(maps[1], 90.0)


def test_a_run_stopped_midway_leaves_the_figures_its_report_describes(tmp_path, monkeypatch):
    """Figures are written only once every layer is done: a run stopped on its second layer leaves the first
    layer's figures of the run before, which the old filters.json still describes, rather than a mix."""
    model = zero_mean_conv_model()
    images = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1)).astype(np.uint8)
    split = fer_data.Split(images, np.arange(4) % 7, np.array([str(i) for i in range(4)]))
    kwargs = {"split": split, "image": images[0], "image_title": "#0", "output_dir": tmp_path, "top_k": 2,
              "steps": 2}
    entries = flt.analyse_layers(model, ["conv1", "conv2"], [0, 1], **kwargs)
    written = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(p.name for p in written) == sorted(Path(p).name for e in entries.values()
                                                    for p in e["figures"].values())
    for path in written:
        assert_png(path)

    analyse_layer = flt.analyse_layer

    def stopped_on_conv2(model, layer, *args, **kw):
        if layer == "conv2":
            raise KeyboardInterrupt
        return analyse_layer(model, layer, *args, **kw)

    monkeypatch.setattr(flt, "analyse_layer", stopped_on_conv2)
    with pytest.raises(KeyboardInterrupt):
        flt.analyse_layers(model, ["conv1", "conv2"], [2, 3], **kwargs)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == written


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_says_when_the_feature_map_image_was_converted(tool_inputs, tmp_path):
    root, model, csv = tool_inputs
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(tmp_path / "photo.jpg")
    result = run_tool("filters", f"--model={model}", f"--data={csv}", f"--output_dir={tmp_path / 'out'}",
                      "--layers=stem_conv", "--filters=0", "--steps=1", "--top_k=1",
                      f"--image={tmp_path / 'photo.jpg'}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{tmp_path / 'photo.jpg'}: 1 image(s) were not 48x48 grayscale and were converted" in result.stderr


def test_cli_writes_grids_and_json(tool_inputs, tmp_path):
    root, model, csv = tool_inputs
    out = tmp_path / "out"
    result = run_tool("filters", f"--model={model}", f"--data={csv}", f"--output_dir={out}", "--filters=0,3",
                     "--steps=2", "--top_k=2", "--image_index=6", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "filters.json").read_text())
    assert list(report["layers"]) == ["stem_relu", "stage4_block2"]
    assert report["feature_map_image"]["index"] == 6 and report["split"] == "val"
    for layer, entry in report["layers"].items():
        assert [f["filter"] for f in entry["filters"]] == [0, 3]
        for f in entry["filters"]:
            assert f["status"] in ("maximised", "not maximised", "dead")
            assert f["start"] == "noise" or set(f["start"]) == {"index", "id"}
            assert len(f["top_k"]) == 2
            assert all(0 <= t["index"] < 7 and t["id"] == str(t["index"]) for t in f["top_k"])
            assert f["top_k"][0]["activation"] >= f["top_k"][1]["activation"]
        assert sorted(Path(p).name for p in entry["figures"].values()) == sorted(
            [f"{layer}_maximization.png", f"{layer}_feature_maps.png", f"{layer}_top2.png"])
        for p in entry["figures"].values():
            assert_png(Path(p))
    assert "stage4_block2 filters 0,3: step 2/2" in result.stderr
    assert "wrote" in result.stdout
    check_json_replaceable(out / "filters.json", flt.REPORT_KEYS, "a filters report")  # a rerun may replace it


@pytest.mark.parametrize("problem", ["empty_output_dir", "infinite_learning_rate", "foreign_json"])
def test_cli_refuses_an_output_dir_it_would_damage_and_non_finite_settings(tool_inputs, tmp_path, problem):
    root, model, csv = tool_inputs
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "filters.json").write_text("[1, 2]\n")
    args = {"empty_output_dir": ["--output_dir="],
            "infinite_learning_rate": [f"--output_dir={tmp_path / 'out'}", "--learning_rate=inf"],
            "foreign_json": [f"--output_dir={tmp_path / 'notes'}"]}[problem]
    result = run_tool("filters", f"--model={model}", f"--data={csv}", "--steps=1", *args, cwd=tmp_path)
    expected = {"empty_output_dir": "--output_dir must not be empty",
                "infinite_learning_rate": "--learning_rate must be a number > 0",
                "foreign_json": f"{tmp_path / 'notes' / 'filters.json'}: exists and is not a filters report; "
                                "choose another --output_dir or remove the file"}[problem]
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error:") and expected in last, result.stderr[-500:]
    assert (tmp_path / "notes" / "filters.json").read_text() == "[1, 2]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_cli_image_index_out_of_range_is_a_one_line_error(tool_inputs, tmp_path):
    root, model, csv = tool_inputs
    out = tmp_path / "filters"
    result = run_tool("filters", f"--model={model}", f"--data={csv}", "--image_index=7", "--steps=1",
                      f"--output_dir={out}", cwd=root)
    assert not out.exists()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "index 7 is out of range of split val" in errors[0] and "fer2013.csv" in errors[0]
