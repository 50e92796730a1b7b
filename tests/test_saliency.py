"""Saliency maps on models whose answer is known, and the ``python -m fer_keras.saliency`` CLI."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import run_tool, write_challenge_csv
from PIL import Image

from fer_keras import CLASS_NAMES
from fer_keras import saliency as sal
from fer_keras.errors import ConfigError, DataError
from fer_keras.history import check_json_replaceable
from fer_keras.vis import parse_int_list

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def left_half_model() -> keras.Model:
    """Logits that depend only on the left 24 columns of the image."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Cropping2D(((0, 0), (0, 24)), name="left_half")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(7, name="logits")(x))


def conv_model(activation: str | None = None) -> keras.Model:
    keras.utils.set_random_seed(2)
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(7, activation=activation, name="logits")(x))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()


# --------------------------------------------------------------------------------------------
# Maps


def test_saliency_is_exactly_zero_where_the_model_does_not_look():
    model = left_half_model()
    x = images(3)
    classes = [0, 3, 6]
    for maps in (sal.vanilla_saliency(model, x, classes), sal.smoothgrad(model, x, classes, samples=3)):
        assert maps.shape == (3, 48, 48)
        assert np.all(maps[:, :, 24:] == 0.0)
        assert np.all(maps[:, :, :24] > 0.0)


def test_raw_saliency_of_a_linear_model_is_its_weights():
    model = left_half_model()
    kernel = model.get_layer("logits").get_weights()[0]  # [48*24, 7]
    raw = sal.vanilla_saliency(model, images(2), [1, 5], normalize=False)
    for i, c in enumerate([1, 5]):
        np.testing.assert_allclose(raw[i, :, :24], np.abs(kernel[:, c]).reshape(48, 24), rtol=1e-5)
    normalized = sal.vanilla_saliency(model, images(2), [1, 5])
    assert normalized.max() == pytest.approx(1.0, abs=1e-5)


def threshold_model() -> keras.Model:
    """Logits that grow with the pixels above 127.5: d logit / d pixel is w / 2304 there and 0 below."""
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.ReLU()(keras.layers.Rescaling(1.0, offset=-127.5)(inputs))
    dense = keras.layers.Dense(7, use_bias=False, name="logits")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(x)))
    dense.set_weights([np.full((1, 7), 2304.0, np.float32)])
    return model


@pytest.mark.parametrize("noise, below", [(0.5, 0.15866), (0.25, 0.02275)])
def test_smoothgrad_averages_the_gradients_of_noisy_copies(noise, below):
    """Pixels 50 grey levels above and below the threshold: their gradients are exactly 1 and 0, and so are the
    vanilla maps. SmoothGrad adds noise of std ``noise`` x the image's range (100), so each pixel's averaged
    gradient is the chance that its noisy copy is above the threshold: Phi(50 / sigma) and 1 - Phi(50 / sigma),
    with sigma 50 / 25 (0.8413 / 0.1587 and 0.9772 / 0.0228). Averaged over each half's 1,152 pixels and 20
    copies, sampling error is under 3 % of the expected value at sigma 50 and under 10 % at sigma 25."""
    image = np.full((1, 48, 48, 1), 77.5, np.float32)
    image[:, :, :24] = 177.5
    model = threshold_model()
    vanilla = sal.vanilla_saliency(model, image, [2], normalize=False)
    assert np.all(vanilla[:, :, :24] == 1.0) and np.all(vanilla[:, :, 24:] == 0.0)
    smooth = sal.smoothgrad(model, image, [2], samples=20, noise=noise, normalize=False, seed=0)
    np.testing.assert_allclose(smooth[:, :, :24].mean(), 1 - below, rtol=0.03)
    np.testing.assert_allclose(smooth[:, :, 24:].mean(), below, rtol=0.3 if below < 0.05 else 0.1)


def test_smoothgrad_seed_reproduces_the_maps_and_leaves_numpys_generator_alone():
    """tf-keras-vis draws the noise from numpy's global generator: a seed gives the same maps twice and other ones
    for another seed, and the caller's next ``np.random`` draw is the one it would have been without the call."""
    image = np.full((1, 48, 48, 1), 77.5, np.float32)
    image[:, :, :24] = 177.5
    model = threshold_model()
    np.random.seed(11)
    expected_next = np.random.random(3)
    np.random.seed(11)
    first = sal.smoothgrad(model, image, [2], samples=5, noise=0.5, normalize=False, seed=0)
    np.testing.assert_array_equal(np.random.random(3), expected_next)
    np.testing.assert_array_equal(sal.smoothgrad(model, image, [2], samples=5, noise=0.5, normalize=False, seed=0),
                                  first)
    assert not np.array_equal(sal.smoothgrad(model, image, [2], samples=5, noise=0.5, normalize=False, seed=1),
                              first)


def test_gradcam_plus_plus_has_the_input_shape():
    cam = sal.gradcam_plus_plus(conv_model(), images(2), [0, 4], layer="features")
    assert cam.shape == (2, 48, 48)
    assert np.isfinite(cam).all()
    assert cam.min() >= 0.0 and cam.max() <= 1.0 + 1e-6


def test_gradcam_plus_plus_lights_up_what_drives_the_class():
    """One brightness detector feeds class 0 positively and class 1 negatively: class 0's map must cover the
    bright square (wherever it is) and be zero away from it; class 1's map must be zero everywhere."""
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(1, 3, padding="same", activation="relu", kernel_initializer="ones", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    weights = keras.initializers.Constant([[1.0, -1.0, 0.5, 0.5, 0.5, 0.5, 0.5]])
    model = keras.Model(inputs, keras.layers.Dense(7, kernel_initializer=weights, name="logits")(x))
    squares = [(slice(4, 16), slice(4, 16)), (slice(30, 44), slice(26, 40))]
    x = np.zeros((2, 48, 48, 1), np.uint8)
    for i, (rows, cols) in enumerate(squares):
        x[i, rows, cols] = 255
    cam = sal.gradcam_plus_plus(model, x, [0, 0], layer="features")
    for i, (rows, cols) in enumerate(squares):
        inside = np.zeros((48, 48), bool)
        inside[rows, cols] = True
        far = np.ones((48, 48), bool)
        far[rows.start - 3:rows.stop + 3, cols.start - 3:cols.stop + 3] = False
        assert inside[np.unravel_index(np.argmax(cam[i]), inside.shape)]
        assert cam[i][inside].mean() > 0.8
        assert np.all(cam[i][far] < 1e-6)
    assert np.all(sal.gradcam_plus_plus(model, x, [1, 1], layer="features") < 1e-6)


def quadrant_model(crop: int = 0) -> keras.Model:
    """A brightness detector on a 2x2 grid of cells (the imagenet stem's last stage), each cell pooling the block of
    the (cropped) image it covers; the logit is their sum."""
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Cropping2D((48 - crop) // 2, name="input_crop")(inputs) if crop else inputs
    x = keras.layers.Conv2D(1, 1, activation="relu", kernel_initializer="ones", name="bright")(x)
    x = keras.layers.AveragePooling2D((crop or 48) // 2)(x)
    x = keras.layers.Conv2D(1, 1, activation="relu", kernel_initializer="ones", name="cells")(x)
    return keras.Model(inputs, keras.layers.Dense(7, kernel_initializer="ones")(keras.layers.Flatten()(x)))


@pytest.mark.parametrize("crop", [0, 32])
def test_gradcam_plus_plus_cells_light_the_pixels_they_cover(crop):
    """The top-left cell lights its own block, not a ramp from the image's corner (tf-keras-vis' corner-aligned
    zoom put the quadrant's centre at 0.55); a model with ``input_crop`` is mapped onto the window it sees."""
    side = crop or 48
    offset = (48 - side) // 2
    block = slice(offset, offset + side // 2)
    x = np.zeros((1, 48, 48, 1), np.uint8)
    x[0, block, block] = 255
    cam = sal.gradcam_plus_plus(quadrant_model(crop), x, [0], layer="cells")[0]
    inner = slice(offset, offset + side // 4)  # the block's outer half: its cell's value alone
    np.testing.assert_allclose(cam[inner, inner], 1.0)
    assert cam[block, block].mean() > 0.75 and cam[offset + side // 2:offset + side, offset + side // 2:].max() < 0.3
    if crop:
        border = np.ones((48, 48), bool)
        border[offset:offset + side, offset:offset + side] = False
        assert np.all(cam[border] == 0.0)


def test_place_cam_keeps_edge_cells_and_centres_the_window():
    cells = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
    full = sal.place_cam(cells, 48)
    assert full.shape == (1, 48, 48) and full[0, :12, :12].min() == 1.0 and full[0, 36:, :].max() == 0.0
    ramp = full[0, 11:37, 0]  # from the first cell's centre to the next's: 1 down to 0
    assert ramp[0] == 1.0 and ramp[-1] == 0.0 and np.all(np.diff(ramp) < 0)
    windowed = sal.place_cam(cells, 48, crop=40)
    assert windowed[0, 4:14, 4:14].min() == 1.0 and windowed[0, :4].max() == 0.0 and windowed[0, :, 44:].max() == 0.0


def shifted(model: keras.Model, shift: float) -> keras.Model:
    """A copy of ``model`` whose logits are all ``shift`` higher: the same gradients, other exp(logit)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    kernel, bias = copy.get_layer("logits").get_weights()
    copy.get_layer("logits").set_weights([kernel, bias + shift])
    return copy


def test_gradcam_plus_plus_survives_logits_beyond_exp_range():
    """tf-keras-vis weighs Grad-CAM++ by exp(logit) in float32: inf above ~88, 0 below ~-103. Shifting every logit
    changes no gradient, so the normalised maps must not change; unnormalised ones scale by exp(shift)."""
    model, x, classes = conv_model(), images(3, seed=4), [0, 3, 6]
    base = sal.gradcam_plus_plus(model, x, classes, layer="features")
    assert base.max() > 0.9
    for shift in (200.0, -200.0):
        maps = sal.gradcam_plus_plus(shifted(model, shift), x, classes, layer="features")
        assert np.isfinite(maps).all()
        np.testing.assert_allclose(maps, base, atol=1e-5)
    raw = sal.gradcam_plus_plus(model, x, classes, layer="features", normalize=False)
    raw_up = sal.gradcam_plus_plus(shifted(model, 5.0), x, classes, layer="features", normalize=False)
    assert raw.max() > 0
    np.testing.assert_allclose(raw_up, raw * np.exp(5.0), rtol=1e-4, atol=1e-6 * raw.max() * np.exp(5.0))


def test_served_probabilities_average_the_exports_views():
    """With a TTA built into the export, the report's predictions are the served ones (image and mirror image)."""
    model, x = conv_model(), images(4, seed=5)
    logits = np.stack([np.asarray(model(v.astype(np.float32))) for v in (x, x[:, :, ::-1])])
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(sal.served_probabilities(model, x, "flip"), probs.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(sal.served_probabilities(model, x), probs[0], atol=1e-5)


def test_served_views_are_the_exports_own(tmp_path):
    from fer_keras.export import export_model
    from fer_keras.inference import load_keras, load_predictor, resolve, served_views

    path = export_model(conv_model(), tmp_path, "m", tta="tencrop", crop_size=44)
    views = served_views(*resolve(path))
    assert views == ("tencrop", 44) and served_views("keras", tmp_path / "m.keras") == ("none", 40)
    x = images(3, seed=6)
    np.testing.assert_allclose(sal.served_probabilities(load_keras(path), x, *views),
                               load_predictor(path).probabilities(x), atol=2e-5)


def test_cli_on_an_export_reports_its_ten_crop_at_its_own_crop_size(tool_inputs, tmp_path):
    """An export built with ten-crop of 44 pixels: the tool's probabilities are its served ones, views of 44 (the
    shipped export's 40 is also the default, so its test could not tell)."""
    from fer_keras.export import export_model
    from fer_keras.inference import load_predictor

    _, _, csv = tool_inputs
    path = export_model(conv_model(), tmp_path, "m", tta="tencrop", crop_size=44)
    out = tmp_path / "out"
    result = run_tool("saliency", f"--model={path}", f"--data={csv}", "--indices=0,1,2", "--layer=features",
                      "--smooth_samples=1", f"--output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "saliency.json").read_text())
    got = np.array([[r["probabilities"][name] for name in CLASS_NAMES] for r in report["images"]])
    expected = load_predictor(path).probabilities(sal.from_split(str(csv), "val", [0, 1, 2]).images)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert "tencrop TTA as served" in result.stdout


def test_a_mixed_precision_run_is_explained_in_float32(tmp_path):
    """The best.keras of a --precision=mixed_bfloat16 run: load_keras rebuilds it in float32, with the same
    weights, so tf-keras-vis' float32 scores meet float32 gradients (bfloat16 ones made Grad-CAM++ fail)."""
    from fer_keras.inference import load_keras
    from fer_keras.model import resnet18

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        resnet18("imagenet").save(tmp_path / "best.keras")
    finally:
        keras.config.set_dtype_policy(previous)
    model = load_keras(tmp_path / "best.keras")
    assert {layer.dtype_policy.name for layer in model._flatten_layers()} == {"float32"}
    cam = sal.gradcam_plus_plus(model, images(2), [0, 4])
    assert cam.shape == (2, 48, 48) and np.isfinite(cam).all()
    assert np.isfinite(sal.vanilla_saliency(model, images(2), [0, 4])).all()


def test_gradcam_rejects_unknown_and_flat_layers():
    model = conv_model()
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        sal.gradcam_plus_plus(model, images(1), [0], layer="nope")
    with pytest.raises(ConfigError, match="does not output feature maps"):
        sal.gradcam_plus_plus(model, images(1), [0], layer="logits")


def test_linearize_replaces_softmax_on_a_copy():
    model = conv_model(activation="softmax")
    x = images(2)
    linear = sal.linearize(model)
    assert linear is not model
    probs = np.asarray(model(x.astype(np.float32)))
    logits = np.asarray(linear(x.astype(np.float32)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # the caller's model keeps softmax
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), probs, rtol=1e-4, atol=1e-6)
    logits_model = conv_model()
    assert sal.linearize(logits_model) is logits_model


@pytest.mark.parametrize("head", ["activation", "Softmax", "Activation"])
def test_a_final_softmax_in_any_form_is_explained_through_the_logits(head):
    """A Softmax layer has no ``activation`` attribute: it must not pass for linear and saturate the maps."""
    logits_model = conv_model()
    if head == "activation":
        model = conv_model(activation="softmax")
    else:
        last = keras.layers.Softmax() if head == "Softmax" else keras.layers.Activation("softmax")
        model = keras.Model(logits_model.input, last(logits_model.output))
    x, classes = images(3), [0, 3, 6]
    np.testing.assert_allclose(sal.vanilla_saliency(model, x, classes, normalize=False),
                               sal.vanilla_saliency(logits_model, x, classes, normalize=False), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(model(x.astype(np.float32))).sum(axis=1), 1.0, rtol=1e-5)


def test_a_rerun_with_fewer_images_removes_the_earlier_runs_other_figures(tmp_path):
    def selection(n: int) -> sal.Selection:
        return sal.Selection(images(n), np.arange(n), [f"img{k}" for k in range(n)], ["test"] * n, [None] * n)

    model = conv_model()
    (tmp_path / "001_mine.png").write_bytes(b"not listed by any saliency.json")
    first = sal.explain(model, selection(3), tmp_path, layer="features", smooth_samples=1)
    assert [Path(r["figure"]).name for r in first["images"]] == ["000_img0.png", "001_img1.png", "002_img2.png"]
    sal.explain(model, selection(1), tmp_path, layer="features", smooth_samples=1)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000_img0.png", "001_mine.png", "grid.png"]


def test_figures_name_the_split_their_indices_are_into(tool_inputs, tmp_path, monkeypatch):
    """A figure titled "#3 (id 28712)" did not say of which split #3 is; files are named by their file names."""
    _, _, csv = tool_inputs
    titles = []
    monkeypatch.setattr(sal, "plot_explanation", lambda path, *args, **kwargs: titles.append(args[8]) or Path(path))
    monkeypatch.setattr(sal, "plot_grid", lambda path, *args, **kwargs: Path(path))
    chosen = sal.from_split(str(csv), "PublicTest", [1, 0])
    sal.explain(conv_model(), chosen, tmp_path / "split", layer="features", smooth_samples=1)
    assert titles == [f"val (PublicTest) #1 (id {chosen.ids[0]})", f"val (PublicTest) #0 (id {chosen.ids[1]})"]
    face = tmp_path / "happy" / "face.png"
    face.parent.mkdir()
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(face)
    titles.clear()
    sal.explain(conv_model(), sal.from_files([str(face)]), tmp_path / "files", layer="features", smooth_samples=1)
    assert titles == ["face.png"]


def test_the_maps_explain_the_target_class_and_are_saved(tmp_path):
    """With ``target="true"`` every map is of the true class's logit, also where the model predicts another; the
    maps are saved in maps.npz beside the figures, and a maps.npz the tool did not write is refused first."""
    model = conv_model()
    x = images(4)
    probs = sal.served_probabilities(model, x, "none", 40)
    labels = (probs.argmax(axis=1) + np.array([1, 2, 3, 0])) % 7  # three of four differ from the prediction
    chosen = sal.Selection(x, labels, [f"img{k}" for k in range(4)], ["test"] * 4, [None] * 4)
    report = sal.explain(model, chosen, tmp_path, target="true", layer="features", smooth_samples=1)
    assert report["maps"] == str(tmp_path / sal.MAPS_FILE)
    with np.load(report["maps"]) as maps:
        assert maps["ids"].tolist() == chosen.ids and maps["targets"].tolist() == labels.tolist()
        np.testing.assert_allclose(maps["saliency"], sal.vanilla_saliency(model, x, labels), atol=1e-6)
        np.testing.assert_allclose(maps["gradcam_plus_plus"], sal.gradcam_plus_plus(model, x, labels, "features"),
                                   atol=1e-6)
        assert maps["smoothgrad"].shape == (4, 48, 48)
        assert not np.allclose(maps["saliency"], sal.vanilla_saliency(model, x, probs.argmax(axis=1)), atol=1e-3)

    other = tmp_path / "other"
    other.mkdir()
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))  # one array saved under an .npz name: np.load gives no archive
    for mine in (b"my own arrays", b"PK\x03\x04 a damaged zip archive", npy.getvalue()):
        (other / sal.MAPS_FILE).write_bytes(mine)
        with pytest.raises(ConfigError, match=r"maps.npz: exists and is not saliency maps; choose another "):
            sal.explain(model, chosen, other, layer="features", smooth_samples=1)
        assert [p.name for p in other.iterdir()] == [sal.MAPS_FILE]


def test_class_count_must_match_images():
    with pytest.raises(ConfigError, match="2 target classes for 3 images"):
        sal.vanilla_saliency(left_half_model(), images(3), [0, 1])
    with pytest.raises(ConfigError, match="outside 0-6"):
        sal.vanilla_saliency(left_half_model(), images(1), [7])


def test_target_classes():
    preds = np.array([3, 4])
    np.testing.assert_array_equal(sal.target_classes("pred", np.array([-1, -1]), preds, ["a", "b"]), preds)
    np.testing.assert_array_equal(sal.target_classes("true", np.array([0, 6]), preds, ["a", "b"]), [0, 6])
    with pytest.raises(ConfigError, match="image b has no label"):
        sal.target_classes("true", np.array([0, -1]), preds, ["a", "b"])


# --------------------------------------------------------------------------------------------
# Choosing images


def test_parse_int_list():
    assert parse_int_list(["0", "3-5", " 9 "], "--indices") == [0, 3, 4, 5, 9]
    with pytest.raises(ConfigError, match="--indices: 'x'"):
        parse_int_list(["x"], "--indices")
    with pytest.raises(ConfigError, match="empty"):
        parse_int_list(["5-3"], "--indices")
    with pytest.raises(ConfigError, match="--indices: range '0-9999999999' has more than 100,000 numbers"):
        parse_int_list(["0-9999999999"], "--indices")  # refused before a list of ten billion is built
    assert len(parse_int_list(["0-28708"], "--indices")) == 28_709


def test_split_selection(tmp_path):
    csv = tmp_path / "fer2013.csv"
    write_challenge_csv(csv, n_val_per_class=2)
    chosen = sal.from_split(str(csv), "val", None)
    assert chosen.indices == [0, 2, 4, 6, 8, 10, 12]  # first image of each class
    assert chosen.labels.tolist() == list(range(7))
    picked = sal.from_split(str(csv), "PublicTest", [13, 1])
    assert picked.indices == [13, 1] and picked.labels.tolist() == [6, 0]
    with pytest.raises(DataError, match=r"fer2013\.csv: index 14 is out of range of split val .* 14 images"):
        sal.from_split(str(csv), "val", [14])


def test_file_selection_takes_labels_from_class_folders(tmp_path, caplog):
    (tmp_path / "happy").mkdir()
    Image.fromarray(images(1)[0, :, :, 0]).save(tmp_path / "happy" / "a.png")
    Image.fromarray(images(1, seed=1)[0, :, :, 0]).resize((64, 64)).convert("RGB").save(tmp_path / "b.jpg")
    with caplog.at_level(logging.WARNING):
        chosen = sal.from_files([str(tmp_path / "happy" / "a.png"), str(tmp_path / "b.jpg")])
    assert "--images: 1 image(s) were not 48x48 grayscale and were converted" in caplog.text
    assert chosen.images.shape == (2, 48, 48, 1)
    assert chosen.labels.tolist() == [CLASS_NAMES.index("happy"), -1]
    with pytest.raises(DataError, match="missing.png: no such file"):
        sal.from_files([str(tmp_path / "missing.png")])


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_figures_grid_and_json(tool_inputs, tmp_path):
    root, model, csv = tool_inputs
    out = tmp_path / "out"
    result = run_tool("saliency", f"--model={model}", f"--data={csv}", f"--output_dir={out}", "--smooth_samples=2",
                     "--target=true", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "saliency.json").read_text())
    assert report["layer"] == "stage4_block2" and report["target"] == "true"
    assert [r["true_label"] for r in report["images"]] == list(CLASS_NAMES)
    for r in report["images"]:
        assert r["target"] == r["true"]
        assert r["pred_label"] == CLASS_NAMES[r["pred"]]
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert_png(Path(r["figure"]))
    assert_png(Path(report["grid"]))
    assert len(list(out.glob("*.png"))) == len(CLASS_NAMES) + 1
    with np.load(out / sal.MAPS_FILE) as maps:
        assert maps["targets"].tolist() == [r["true"] for r in report["images"]]
        assert maps["saliency"].shape == maps["smoothgrad"].shape == maps["gradcam_plus_plus"].shape == (7, 48, 48)
    assert "wrote 7 figure(s)" in result.stdout
    check_json_replaceable(out / "saliency.json", sal.REPORT_KEYS, "a saliency report")  # a rerun may replace it


def test_main_seed_makes_smoothgrad_reproducible(tool_inputs, tmp_path, monkeypatch, capsys):
    """``--seed`` seeds SmoothGrad's noise: the same seed gives the same maps, another seed other ones. main reads
    absl's parsed flags; the test stands in for them."""
    from types import SimpleNamespace

    root, model, csv = tool_inputs
    maps = []
    for run, seed in enumerate((3, 3, 4)):
        out = tmp_path / str(run)
        flag_values = SimpleNamespace(indices=["0"], images=None, data=str(csv), split="val", skip_bad_rows=False,
                                      model=str(model), seed=seed, output_dir=str(out), target="pred",
                                      layer="stage4_block2", smooth_samples=2, smooth_noise=sal.DEFAULT_SMOOTH_NOISE)
        monkeypatch.setattr(sal, "flags", SimpleNamespace(FLAGS=flag_values))
        sal.main(["saliency"])
        with np.load(out / sal.MAPS_FILE) as saved:
            maps.append(saved["smoothgrad"])
        assert json.loads((out / "saliency.json").read_text())["smooth_seed"] == seed
    assert "saliency.json" in capsys.readouterr().out
    np.testing.assert_array_equal(maps[0], maps[1])
    assert not np.array_equal(maps[0], maps[2])


def test_cli_index_out_of_range_is_a_one_line_error(tool_inputs, tmp_path):
    root, model, csv = tool_inputs
    result = run_tool("saliency", f"--model={model}", f"--data={csv}", "--indices=0,99",
                      f"--output_dir={tmp_path / 'bad'}", cwd=root)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "index 99 is out of range" in errors[0] and "fer2013.csv" in errors[0]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("problem", ["output_dir_under_a_file", "negative_seed", "empty_output_dir",
                                     "infinite_noise", "percent_noise", "empty_image_entry", "images_and_split",
                                     "foreign_json"])
def test_cli_bad_output_dir_or_seed_is_a_one_line_error(tool_inputs, tmp_path, problem):
    root, model, csv = tool_inputs
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "saliency.json").write_text('{"mine": 1}\n')
    args = {"output_dir_under_a_file": [f"--output_dir={tmp_path / 'a_file' / 'out'}"],
            "negative_seed": [f"--output_dir={tmp_path / 'out'}", "--seed=-1"],
            "empty_output_dir": ["--output_dir="],
            "infinite_noise": [f"--output_dir={tmp_path / 'out'}", "--smooth_noise=inf"],
            # A percentage read as a fraction gave a blank map and exit 0.
            "percent_noise": [f"--output_dir={tmp_path / 'out'}", "--smooth_noise=20"],
            # The empty entry was named as "." (not an image file).
            "empty_image_entry": [f"--output_dir={tmp_path / 'out'}", f"--images={root / 'face.png'},"],
            # --data and --split were ignored without a word.
            "images_and_split": [f"--output_dir={tmp_path / 'out'}", f"--images={root / 'face.png'}", "--split=test"],
            "foreign_json": [f"--output_dir={tmp_path / 'notes'}"]}[problem]
    where = [] if problem in ("empty_image_entry", "images_and_split") else ["--indices=0"]
    result = run_tool("saliency", f"--model={model}", f"--data={csv}", *where, *args, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    expected = {"output_dir_under_a_file": "a_file", "negative_seed": "--seed must be in [0, 2147483647]",
                "empty_output_dir": "--output_dir must not be empty",
                "infinite_noise": "--smooth_noise must be in (0, 1], a fraction of the value range (0.2 is 20 %)",
                "percent_noise": "--smooth_noise must be in (0, 1]",
                "empty_image_entry": "--images has an empty entry (a stray comma?)",
                "images_and_split": "--images names its image files itself; --data and --split choose split images "
                                    "(with --indices)",
                "foreign_json": f"{tmp_path / 'notes' / 'saliency.json'}: exists and is not a saliency report; "
                                "choose another --output_dir or remove the file"}[problem]
    assert (tmp_path / "notes" / "saliency.json").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "notes"]
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error:") and expected in last, result.stderr[-500:]


def test_a_caption_says_when_the_prediction_averages_served_views():
    """With the export's ten-crop the predicted class is not necessarily the class of the image the maps explain."""
    assert sal._caption(3, 3, 0.8) == "true: happy, pred: happy (80%)"
    assert sal._caption(3, 3, 0.8, "tencrop", 3) == "true: happy, pred: happy (80%, tencrop as served)"
    assert sal._caption(-1, 3, 0.8, "tencrop", 6) == (
        "true: unknown, pred: happy (80%, tencrop as served; the image alone: neutral)")


def test_cli_on_the_shipped_export_reports_what_it_serves(tmp_path):
    """The shipped export averages its built-in TTA's views: the report's probabilities are its served ones, not
    those of the bare network whose gradients the maps show."""
    from fer_keras.inference import SHIPPED_MODEL, load_predictor

    out = tmp_path / "out"
    # Images 0-2, and 13, on which ten-crop's class is not the bare network's (session 48's shipped version 8).
    result = run_tool("saliency", "--indices=0,1,2,13", f"--output_dir={out}", "--smooth_samples=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "saliency.json").read_text())
    served = load_predictor(SHIPPED_MODEL)
    assert report["model"] == "shipped model" and report["prediction_tta"] == (served.metadata.get("tta") or "none")
    split = sal.from_split(None, "val", [0, 1, 2, 13])
    expected = served.probabilities(split.images)
    got = np.array([[r["probabilities"][name] for name in CLASS_NAMES] for r in report["images"]])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert [r["pred"] for r in report["images"]] == list(expected.argmax(axis=1))
    # The maps explain the image itself: the figures say which class the network alone gives it.
    alone = load_predictor(SHIPPED_MODEL, network_only=True).probabilities(split.images).argmax(axis=1)
    assert [r["image_alone_pred_label"] for r in report["images"]] == [sal.class_name(int(c)) for c in alone]
    if report["prediction_tta"] != "none":
        assert f"{report['prediction_tta']} TTA as served" in result.stdout


def test_the_colour_bars_say_what_they_measure(monkeypatch, tmp_path):
    """Each panel's colour bar names its quantity and scale: unlabelled, a 0-1 bar read as absolute gradients."""
    figures = []
    monkeypatch.setattr(sal, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    rng = np.random.default_rng(0)
    maps = [rng.uniform(0, 1, (48, 48)) for _ in range(3)]
    sal.plot_explanation(tmp_path / "x.png", rng.uniform(0, 255, (48, 48, 1)), *maps, label=3, pred=3, prob=0.9,
                         target=3)
    colorbars = [ax for ax in figures[0].axes if ax.get_label() == "<colorbar>"]
    assert [ax.get_ylabel() for ax in colorbars] == list(sal.COLORBAR_LABELS)
