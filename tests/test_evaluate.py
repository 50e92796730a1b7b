"""Tests of fer_keras.evaluate and fer_keras.tta with tiny models whose predictions are known.

The "level" model averages all pixels and predicts the class whose level (LEVELS) is nearest to the
mean brightness: its logits are 2*c_k*m - c_k**2 = m**2 - (m - c_k)**2 for mean m and level c_k. It
is symmetric under mirroring, and on a uniform image also under cropping.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tool
from conftest import write_challenge_csv as random_challenge_csv

from fer_keras import CLASS_NAMES, IMAGE_SIZE
from fer_keras import data as fer_data
from fer_keras.errors import ConfigError, DataError

LEVELS = np.array([20, 55, 90, 125, 160, 195, 230])
# (true label, class whose level the image gets, i.e. the prediction) of each PublicTest row.
VAL_ROWS = [
    (0, 0), (0, 0), (0, 2),
    (1, 1), (1, 0),
    (2, 2), (2, 4), (2, 4),
    (3, 3), (3, 3), (3, 3), (3, 6),
    (4, 4), (4, 2),
    (5, 5),
    (6, 6), (6, 3),
]
# The same, counted by hand: rows are true classes, columns predictions.
EXPECTED_CONFUSION = np.array([
    [2, 0, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 2, 0, 0],
    [0, 0, 0, 3, 0, 0, 1],
    [0, 0, 1, 0, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 1, 0, 0, 1],
])


def level_image(level: int, stripe: int = 10) -> np.ndarray:
    """A 48x48 image of mean ``level`` whose left half is brighter: mirroring changes it."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE), level, np.int64)
    image[:, : IMAGE_SIZE // 2] += stripe
    image[:, IMAGE_SIZE // 2:] -= stripe
    return image


def write_challenge_csv(path: Path, rows: list[tuple[int, int, str]]) -> Path:
    """``emotion,pixels,Usage`` rows from (label, predicted class, usage)."""
    lines = ["emotion,pixels,Usage"]
    for label, cls, usage in rows:
        pixels = " ".join(str(v) for v in level_image(int(LEVELS[cls])).ravel())
        lines.append(f"{label},{pixels},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


def level_model():
    import keras

    centres = LEVELS / 255.0
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="pixels")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(7, name="logits")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([(2 * centres)[None, :].astype(np.float32), (-(centres**2)).astype(np.float32)])
    return model


class ArrayPredictor:
    """A predictor stub computing probabilities with a numpy function (for TTA checks)."""

    kind = "keras"
    path = Path("stub.keras")
    metadata: dict = {}

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn
        self.seen: list[np.ndarray] = []

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        self.seen.append(np.asarray(images))
        logits = self.logits_fn(np.asarray(images, np.float64))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A data file, the level model as .keras, and exports of it without and with flip TTA."""
    from fer_keras.export import export_model

    root = tmp_path_factory.mktemp("evaluate")
    rows = [(label, cls, "PublicTest") for label, cls in VAL_ROWS]
    rows += [(k, k, "Training") for k in range(7)] + [(3, 5, "PrivateTest"), (5, 5, "PrivateTest")]
    csv_path = write_challenge_csv(root / "fer2013.csv", rows)
    model = level_model()
    keras_path = root / "level.keras"
    model.save(keras_path)
    export_none = export_model(model, root / "exports", name="level", tta="none")
    export_flip = export_model(model, root / "exports", name="level_flip", tta="flip")
    return {"root": root, "csv": csv_path, "keras": keras_path, "export": export_none, "export_flip": export_flip}


@pytest.fixture(scope="module")
def keras_predictor(setup):
    from fer_keras.inference import load_predictor

    return load_predictor(setup["keras"])


def test_confusion_matrix_function_counts_by_hand():
    from fer_keras.evaluate import confusion_matrix

    labels = np.array([label for label, _ in VAL_ROWS])
    preds = np.array([pred for _, pred in VAL_ROWS])
    np.testing.assert_array_equal(confusion_matrix(labels, preds), EXPECTED_CONFUSION)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]))


def test_a_normalised_figure_refuses_counts():
    """The model card once drew counts on the 0-1 scale of fractions: every cell dark, each labelled 296.00."""
    from fer_keras.evaluate import confusion_figure

    rates = EXPECTED_CONFUSION / np.maximum(EXPECTED_CONFUSION.sum(axis=1, keepdims=True), 1)
    assert confusion_figure(rates, "rates", normalized=True) is not None
    with pytest.raises(ValueError, match="not counts"):
        confusion_figure(EXPECTED_CONFUSION, "counts", normalized=True)


def test_normalize_and_most_confused():
    from fer_keras.evaluate import most_confused, normalize_rows

    rates = normalize_rows(EXPECTED_CONFUSION)
    np.testing.assert_allclose(rates[2], [0, 0, 1 / 3, 0, 2 / 3, 0, 0])
    np.testing.assert_allclose(rates.sum(axis=1), 1.0)
    # The only error made twice: fear (2) taken for sad (4).
    assert most_confused(EXPECTED_CONFUSION) == (2, 4, 2)
    assert most_confused(np.diag([3, 0, 1, 0, 0, 0, 0])) is None
    assert normalize_rows(np.zeros((7, 7))).sum() == 0


def test_evaluate_known_predictions(setup, keras_predictor):
    from fer_keras.evaluate import evaluate, summary

    split = fer_data.load(setup["csv"]).split("PublicTest")
    result = evaluate(keras_predictor, split, split_name="PublicTest")
    np.testing.assert_array_equal(result.confusion, EXPECTED_CONFUSION)
    np.testing.assert_array_equal(result.predictions, [pred for _, pred in VAL_ROWS])
    assert result.split == "val" and result.split_label == "val (PublicTest)"
    assert result.num_images == len(VAL_ROWS)
    assert result.accuracy == pytest.approx(10 / 17)
    # fear: 1 of 3 found (recall), 1 of 3 fear predictions right (precision).
    assert result.recall[2] == pytest.approx(1 / 3) and result.precision[2] == pytest.approx(1 / 3)
    assert result.support.tolist() == [3, 2, 3, 4, 2, 1, 2]
    assert result.export_tta is None
    # Every class by hand from the confusion matrix (rows: true, columns: predicted).
    hits = np.diag(EXPECTED_CONFUSION).astype(float)
    precision, recall = hits / EXPECTED_CONFUSION.sum(axis=0), hits / EXPECTED_CONFUSION.sum(axis=1)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(7), where=precision + recall > 0)
    np.testing.assert_allclose(result.precision, precision)
    np.testing.assert_allclose(result.recall, recall)
    assert result.precision[1] == 1.0 and result.recall[1] == 0.5  # disgust: they differ
    assert result.macro_f1 == pytest.approx(f1.mean())
    assert result.weighted_f1 == pytest.approx((f1 * result.support).sum() / 17)
    # Without its one image, surprise is neither a label nor a prediction: the macro F1 is over the other six.
    without = evaluate(keras_predictor, split.take(np.flatnonzero(split.labels != 5)), split_name="PublicTest")
    assert without.present_classes.tolist() == [0, 1, 2, 3, 4, 6]
    assert without.macro_f1 == pytest.approx(np.delete(f1, 5).mean())
    text = summary(result)
    assert "val (PublicTest): accuracy 58.82% (10/17 images)" in text
    assert "most confused: fear -> sad (2 images, 66.7% of fear)" in text


def test_evaluate_refuses_unlabeled_split(keras_predictor):
    from fer_keras.evaluate import evaluate

    split = fer_data.Split(np.zeros((2, 48, 48, 1), np.uint8), np.array([-1, 3]), np.array(["a", "b"]))
    with pytest.raises(DataError, match="1 of 2 images have no label"):
        evaluate(keras_predictor, split, split_name="test")


def test_flip_tta_on_symmetric_model_equals_none(setup, keras_predictor):
    from fer_keras.tta import tta_probabilities

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 48, 48, 1)).astype(np.uint8)
    images = np.concatenate([images, fer_data.load(setup["csv"]).split("val").images])
    plain = tta_probabilities(keras_predictor, images, "none", batch_size=4)
    flipped = tta_probabilities(keras_predictor, images, "flip", batch_size=4)
    np.testing.assert_allclose(flipped, plain, atol=1e-6)
    np.testing.assert_allclose(plain.sum(axis=1), 1.0, atol=1e-5)


def test_flip_tta_averages_softmax_of_mirror_image():
    from fer_keras.tta import tta_probabilities

    rng = np.random.default_rng(1)
    weights = rng.normal(size=(48 * 48, 7)) / 500.0
    stub = ArrayPredictor(lambda x: x.reshape(len(x), -1) @ weights)
    images = rng.integers(0, 256, (5, 48, 48, 1)).astype(np.uint8)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    flat = images.astype(np.float64)
    expected = (softmax(flat.reshape(5, -1) @ weights) + softmax(flat[:, :, ::-1].reshape(5, -1) @ weights)) / 2
    got = tta_probabilities(stub, images, "flip", batch_size=2)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, softmax(flat.reshape(5, -1) @ weights), atol=1e-3)


def test_tencrop_views_are_corner_and_centre_crops_with_mirrors():
    import tensorflow as tf

    from fer_keras.tta import tta_probabilities, views

    columns = np.tile(np.arange(48, dtype=np.float32), (48, 1))
    image = (columns + 48 * columns.T)[None, :, :, None]  # value = 48*row + column
    v = views(image, "tencrop", crop_size=40)
    assert v.shape == (10, 1, 48, 48, 1) and v.dtype == np.float32
    corners = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]  # top-left, top-right, bottom-left, bottom-right, centre
    for k, (top, left) in enumerate(corners):  # each view by hand: its window sliced out and resized back to 48
        crop = tf.image.resize(image[:, top:top + 40, left:left + 40], (48, 48), method="bilinear").numpy()
        np.testing.assert_allclose(v[k], crop, atol=1e-4, err_msg=f"view {k}")
    means = v.reshape(10, -1).mean(axis=1)
    top_left, top_right, bottom_left, bottom_right = means[:4]
    assert top_left < top_right < bottom_left < bottom_right  # 8 columns right, then 8 rows down
    np.testing.assert_allclose(v[5:], v[:5, :, :, ::-1], atol=1e-6)
    # On a uniform image every view is the image, so ten-crop changes nothing.
    stub = ArrayPredictor(lambda x: np.stack([x.mean(axis=(1, 2, 3)) / 255.0 * k for k in range(7)], axis=1))
    uniform = np.full((3, 48, 48, 1), 77, np.uint8)
    np.testing.assert_allclose(tta_probabilities(stub, uniform, "tencrop"), tta_probabilities(stub, uniform, "none"),
                               atol=1e-6)
    assert stub.seen[0].shape == (30, 48, 48, 1)
    with pytest.raises(ConfigError):
        views(image, "tencrop", crop_size=49)
    with pytest.raises(ConfigError):
        views(image, "rotate")


def test_export_gives_the_same_evaluation_as_keras(setup, keras_predictor):
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import load_predictor

    split = fer_data.load(setup["csv"]).split("val")
    exported = load_predictor(setup["export"])
    assert exported.kind == "saved_model"
    for tta in ("none", "tencrop"):
        a = evaluate(keras_predictor, split, tta, split_name="val")
        b = evaluate(exported, split, tta, split_name="val")
        np.testing.assert_array_equal(a.confusion, b.confusion)
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        assert a.accuracy == b.accuracy
        np.testing.assert_allclose(a.f1, b.f1)
    assert b.export_tta == "none" and a.export_tta is None


def test_report_files(setup, keras_predictor, tmp_path):
    import matplotlib.image
    from PIL import Image

    from fer_keras.evaluate import evaluate, write_report

    split = fer_data.load(setup["csv"]).split("val")
    result = evaluate(keras_predictor, split, "flip", split_name="val")
    files = write_report(result, tmp_path / "out", source=str(setup["csv"]))
    for key in ("png_counts", "png_normalized"):
        png = files[key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300
        assert matplotlib.image.imread(png).ndim == 3
    payload = json.loads(files["json"].read_text())
    assert payload["split"] == "val" and payload["split_label"] == "val (PublicTest)"
    assert payload["tta"] == "flip" and payload["num_images"] == 17
    assert payload["accuracy"] == pytest.approx(10 / 17)
    assert payload["confusion_counts"] == EXPECTED_CONFUSION.tolist()
    assert payload["confusion_normalized"][2][4] == pytest.approx(2 / 3)
    assert payload["per_class"]["fear"]["support"] == 3
    assert payload["model"] == str(setup["keras"])
    assert payload["per_class"]["disgust"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                               "support": 2}
    assert payload["most_confused"] == {"true": "fear", "predicted": "sad", "count": 2, "rate": pytest.approx(2 / 3)}
    lines = files["csv"].read_text().splitlines()
    assert lines[0].startswith("id,label,label_name,predicted,predicted_name,correct,prob_angry")
    assert len(lines) == 18
    rows = [line.split(",")[1:6] for line in lines[1:]]
    assert [(int(r[0]), int(r[2])) for r in rows] == VAL_ROWS
    for label, label_name, pred, pred_name, correct in rows:
        assert (label_name, pred_name, int(correct)) == (CLASS_NAMES[int(label)], CLASS_NAMES[int(pred)],
                                                         int(label == pred))
    assert "fear" in files["report"].read_text()
    assert not [p for p in files["json"].parent.iterdir() if p.name.startswith(".")]


def test_report_is_drawn_before_anything_is_written(setup, keras_predictor, tmp_path, monkeypatch):
    """A rerun stopped while drawing leaves the earlier set of files whole; the listing JSON is written last."""
    from fer_keras import evaluate as ev

    split = fer_data.load(setup["csv"]).split("val")
    result = ev.evaluate(keras_predictor, split, "none", split_name="val")
    events = []
    draw, write = ev.confusion_figure, ev.atomic_write
    monkeypatch.setattr(ev, "confusion_figure", lambda *a, **k: events.append("draw") or draw(*a, **k))
    monkeypatch.setattr(ev, "atomic_write",
                        lambda path, content: events.append(Path(path).name) or write(path, content))
    files = ev.write_report(result, tmp_path / "out")
    assert events[:2] == ["draw", "draw"] and "draw" not in events[2:]
    assert sorted(events[2:]) == sorted(p.name for p in files.values()) and events[-1] == files["json"].name
    assert sorted(json.loads(files["json"].read_text())["files"].values()) == sorted(events[2:-1])
    (tmp_path / "in_the_way" / "val_report.txt").mkdir(parents=True)  # the last file's name taken by a folder
    events.clear()
    with pytest.raises(ConfigError, match=r"val_report.txt: is a directory, expected an output file name"):
        ev.write_report(result, tmp_path / "in_the_way")
    assert "draw" in events and not [e for e in events if e != "draw"]  # refused before anything was written


def test_cli_on_flip_export_records_export_tta(setup, tmp_path):
    out = tmp_path / "reports"
    proc = run_tool("evaluate", f"--model={setup['export_flip'].parent}", f"--data={setup['csv']}",
                   "--split=PublicTest", f"--output_dir={out}", "--batch_size=8")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads((out / "val_metrics.json").read_text())
    assert payload["export_tta"] == "flip" and payload["tta"] == "none"
    assert payload["model"] == str(setup["export_flip"])
    assert payload["confusion_counts"] == EXPECTED_CONFUSION.tolist()
    assert "val (PublicTest): accuracy 58.82%" in proc.stdout
    assert (out / "val_confusion_normalized.png").is_file()
    # TTA on top of the export's own would average views of views: refused, in one line.
    stacked = run_tool("evaluate", f"--model={setup['export_flip'].parent}", f"--data={setup['csv']}",
                       "--split=PublicTest", f"--output_dir={out}", "--tta=tencrop")
    assert stacked.returncode == 2
    assert stacked.stderr.strip().splitlines() == [
        f"error: {setup['export_flip']} already averages flip views (the TTA built into the export); "
        "--tta=tencrop would average views of those views: use --tta=none"]


def test_an_export_whose_metadata_is_gone_or_damaged_gets_no_tta_on_top(setup, tmp_path):
    """The metadata names the views an export averages itself. Gone, a view-free signature still shows that it
    averages some, so TTA on top is refused as for a named one; damaged, it is named, not read as "none" (either
    way flip or ten-crop used to be applied on top of the export's flip)."""
    import shutil

    from fer_keras.errors import ModelError
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import load_predictor

    split = fer_data.load(setup["csv"]).split("val")
    bare = tmp_path / "bare" / "1"
    shutil.copytree(setup["export_flip"], bare)
    metadata = bare / "assets.extra" / "fer_keras.json"
    metadata.unlink()
    predictor = load_predictor(bare)
    assert predictor.built_in_tta == "unknown"
    with pytest.raises(ConfigError, match=r"already averages views built into the export, which its missing metadata "
                                          r"\(assets.extra/fer_keras.json\) named; --tta=flip would average views"):
        evaluate(predictor, split, "flip", split_name="val")
    assert evaluate(predictor, split, "none", split_name="val").export_tta == "unknown"
    for damage in ('{"tta": "fl', "[1]"):
        metadata.write_text(damage)
        with pytest.raises(ModelError, match=f"{metadata}: damaged export metadata"):
            load_predictor(bare)


def assert_one_line_error(proc, message: str) -> None:
    """The tool exited 2 with one ``error: ...`` line on stderr that contains ``message``."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def shifted_level_model(shift: int):
    """The level model with its classes rotated by ``shift``: it predicts class (c + shift) % 7 where the level
    model predicts c."""
    model = level_model()
    dense = model.get_layer("logits")
    kernel, bias = dense.get_weights()
    dense.set_weights([np.roll(kernel, shift, axis=1), np.roll(bias, shift)])
    return model


def pixel_model(input_crop: int = 0):
    """Logits from a weight per pixel (of the central ``input_crop`` window, named as resnet18 names it): every
    shift, crop size and mirror image changes them."""
    import keras

    keras.utils.set_random_seed(4)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    if input_crop:
        x = keras.layers.Cropping2D((IMAGE_SIZE - input_crop) // 2, name="input_crop")(x)
    return keras.Model(inputs, keras.layers.Dense(7, name="logits")(keras.layers.Flatten()(x)))


def test_a_crop_models_ten_crop_is_its_own_size_served_or_not_and_recorded_so(tmp_path):
    """A model that sees a central 32-pixel window is shown ten windows of 32 whatever --crop_size says, as a .keras
    model and as an export without TTA built in (whose input crop only its metadata names); the metrics, and the
    TTA choice an export records, say 32."""
    from fer_keras.evaluate import evaluate
    from fer_keras.export import export_model
    from fer_keras.inference import Predictor, load_predictor
    from fer_keras.tta import choose_tta

    random_challenge_csv(tmp_path / "fer2013.csv")
    split = fer_data.load(tmp_path / "fer2013.csv").split("val")
    model = pixel_model(input_crop=32)
    keras_side = evaluate(Predictor("keras", tmp_path / "m.keras", keras_model=model), split, "tencrop",
                          split_name="val", crop_size=40)
    served = evaluate(load_predictor(export_model(model, tmp_path, "m")), split, "tencrop", split_name="val",
                      crop_size=40)
    np.testing.assert_allclose(served.probabilities, keras_side.probabilities, atol=1e-5)
    for result in (keras_side, served):
        assert result.crop_size == 32 and result.members[0]["crop_size"] == 32
        assert result.to_json()["crop_size"] == 32
    assert choose_tta(Predictor("keras", tmp_path / "m.keras", keras_model=model), split.images, split.labels, "val",
                      crop_size=40).to_json()["crop_size"] == 32
    several = choose_tta(Predictor("keras", tmp_path / "m.keras", keras_model=model), split.images, split.labels,
                         "val", crop_size=[40, 44]).to_json()
    assert several["crop_size"] == 32 and "tencrop_by_crop_size" not in several  # one window, measured once


def test_an_ensemble_of_crop_models_shows_each_member_its_own_windows(tmp_path):
    """Ten-crop of an ensemble whose members see different windows (32 pixels, 36 pixels, the whole image): each
    member gets ten crops of its own size (the uncropped one --crop_size's), the ensemble averages those, and the
    metrics record each member's size beside the asked one; members sharing a window make it the ensemble's."""
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import Ensemble, Predictor
    from fer_keras.tta import tta_probabilities

    random_challenge_csv(tmp_path / "fer2013.csv")
    split = fer_data.load(tmp_path / "fer2013.csv").split("val")
    members = [Predictor("keras", tmp_path / f"crop{c}.keras", keras_model=pixel_model(c))
               for c in (32, 36, 0)]
    own = [tta_probabilities(m, split.images, "tencrop", size) for m, size in zip(members, (32, 36, 40))]
    asked = tta_probabilities(members[0], split.images, "tencrop", 40)
    np.testing.assert_allclose(asked, own[0], atol=1e-6)  # --crop_size does not reach a crop model
    assert min(np.abs(a - b).max() for a, b in [(own[0], own[1]), (own[1], own[2]), (own[0], own[2])]) > 1e-3
    result = evaluate(Ensemble(members), split, "tencrop", split_name="val", crop_size=40)
    np.testing.assert_allclose(result.probabilities, np.mean(own, axis=0), atol=1e-5)
    assert [m["crop_size"] for m in result.to_json()["members"]] == [32, 36, 40]
    assert result.to_json()["crop_size"] == 40
    same = evaluate(Ensemble(members[:1] + [Predictor("keras", tmp_path / "b.keras", keras_model=pixel_model(32))]),
                    split, "tencrop", split_name="val", crop_size=40)
    assert same.crop_size == 32 and [m["crop_size"] for m in same.members] == [32, 32]


def test_cli_ten_crop_takes_the_crop_size_asked_for(tmp_path):
    """--crop_size=44 reaches the views of export, predict and evaluate (no test passed it: each tool could have
    dropped it for the default 40 unnoticed)."""
    from fer_keras.inference import Predictor, export_metadata
    from fer_keras.tta import tta_probabilities

    model, keras_file, data = pixel_model(), tmp_path / "pixels.keras", tmp_path / "fer2013.csv"
    model.save(keras_file)
    random_challenge_csv(data)  # noise: ten-crop of a level image hardly depends on the crop
    images = fer_data.load(data).split("val").images
    expected = tta_probabilities(Predictor("keras", keras_file, keras_model=model), images, "tencrop", 44)
    default = tta_probabilities(Predictor("keras", keras_file, keras_model=model), images, "tencrop", 40)
    assert np.abs(expected - default).max() > 1e-3
    proc = run_tool("export", f"--model={keras_file}", f"--export_dir={tmp_path}", "--tta=tencrop", "--crop_size=44")
    assert proc.returncode == 0, proc.stderr
    assert export_metadata(tmp_path / "pixels" / "1")["crop_size"] == 44
    submission = tmp_path / "p.csv"
    proc = run_tool("predict", f"--model={keras_file}", f"--data={data}", "--split=val", f"--output={submission}",
                    "--probabilities", "--tta=tencrop", "--crop_size=44")
    assert proc.returncode == 0, proc.stderr
    rows = submission.read_text().splitlines()[1:]
    np.testing.assert_allclose([[float(v) for v in r.split(",")[2:]] for r in rows], expected, atol=1e-5)
    out = tmp_path / "eval"
    proc = run_tool("evaluate", f"--model={tmp_path / 'pixels' / '1'}", "--network_only", f"--data={data}",
                    f"--output_dir={out}", "--tta=tencrop", "--crop_size=44")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads((out / "val_tta-tencrop_network-only_metrics.json").read_text())
    assert payload["crop_size"] == 44 and payload["members"][0]["crop_size"] == 44
    rows = (out / "val_tta-tencrop_network-only_predictions.csv").read_text().splitlines()[1:]
    np.testing.assert_allclose([[float(v) for v in r.split(",")[6:]] for r in rows], expected, atol=1e-5)


def test_ensemble_averages_the_members_probabilities_each_with_its_own_views(setup, keras_predictor):
    """The ensemble's probabilities are the mean of its members' (the members disagree on every image), and
    each member applies the TTA itself: an export with flip built in is refused flip on top, inside an ensemble
    as alone."""
    from fer_keras.evaluate import _title, evaluate, summary
    from fer_keras.inference import Ensemble, Predictor, load_predictor

    split = fer_data.load(setup["csv"]).split("val")
    shifted = Predictor("keras", Path("shifted.keras"), keras_model=shifted_level_model(3))
    ensemble = Ensemble([keras_predictor, shifted])
    for tta in ("none", "flip"):
        a = evaluate(keras_predictor, split, tta, split_name="val")
        b = evaluate(shifted, split, tta, split_name="val")
        both = evaluate(ensemble, split, tta, split_name="val")
        assert not np.array_equal(a.predictions, b.predictions)
        np.testing.assert_allclose(both.probabilities, (a.probabilities + b.probabilities) / 2, atol=1e-6)
        np.testing.assert_array_equal(both.predictions, np.argmax(a.probabilities + b.probabilities, axis=1))
    assert both.model_kind == "ensemble" and both.export_tta is None
    assert [m["model"] for m in both.members] == [str(setup["keras"]), "shifted.keras"]
    assert "model: ensemble of 2: " in summary(both)
    with_flip = Ensemble([keras_predictor, load_predictor(setup["export_flip"])])
    with pytest.raises(ConfigError, match="already averages flip views"):
        evaluate(with_flip, split, "flip", split_name="val")
    served = evaluate(with_flip, split, "none", split_name="val")
    assert [m["export_tta"] for m in served.members] == [None, "flip"]
    assert "views built into the exports: level_flip/1 (flip)" in summary(served)
    assert _title(served, False).startswith("level.keras + level_flip/1 (flip) on val (PublicTest)\n")


def level_probabilities(images: np.ndarray, shift: int = 0) -> np.ndarray:
    """The softmax of ``shifted_level_model(shift)`` computed in numpy from its formula, not by the model."""
    m = np.asarray(images, np.float64).mean(axis=(1, 2, 3)) / 255.0
    centres = LEVELS / 255.0
    logits = np.roll(2 * centres[None, :] * m[:, None] - centres[None, :] ** 2, shift, axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_an_ensemble_of_three_is_the_plain_mean_and_every_output_names_all_members(setup, keras_predictor, tmp_path):
    """Three members, so the mean is not the median (of two it is); the reference is the level models' softmax
    computed in numpy. The summary, the figure title, the metrics and report.txt name all three members, the
    figure title one a line when they do not fit one; an ensemble of one is refused."""
    import dataclasses

    from fer_keras.errors import ModelError
    from fer_keras.evaluate import _title, evaluate, summary, write_report
    from fer_keras.inference import Ensemble, Predictor

    split = fer_data.load(setup["csv"]).split("val")
    members = [keras_predictor] + [Predictor("keras", Path(f"shifted{s}.keras"), keras_model=shifted_level_model(s))
                                   for s in (3, 5)]
    each = np.stack([level_probabilities(split.images, s) for s in (0, 3, 5)])
    assert np.abs(each.mean(axis=0) - np.median(each, axis=0)).max() > 1e-2
    for tta in ("none", "flip"):  # the level models are mirror-symmetric: flip leaves each member's answer as is
        result = evaluate(Ensemble(members), split, tta, split_name="val")
        np.testing.assert_allclose(result.probabilities, each.mean(axis=0), atol=1e-5)
        np.testing.assert_array_equal(result.predictions, np.argmax(each.mean(axis=0), axis=1))
    paths = [str(setup["keras"]), "shifted3.keras", "shifted5.keras"]
    assert result.model == " + ".join(paths) and [m["model"] for m in result.members] == paths
    assert summary(result).splitlines()[0] == f"model: ensemble of 3: {' + '.join(paths)}, probabilities averaged"
    assert _title(result, False).splitlines() == [
        "level.keras + shifted3.keras + shifted5.keras on val (PublicTest)",
        f"accuracy {result.accuracy:.2%} of 17 images, tta flip, mean of 3 models (counts)"]
    long = [dict(m, model=f"/runs/{'a_long_run_name_' * 2}{k}/best.keras") for k, m in enumerate(result.members)]
    assert _title(dataclasses.replace(result, members=long), False).splitlines()[:3] == [
        f"{'a_long_run_name_' * 2}0/best.keras +", f"{'a_long_run_name_' * 2}1/best.keras +",
        f"{'a_long_run_name_' * 2}2/best.keras on val (PublicTest)"]
    files = write_report(result, tmp_path, source=str(setup["csv"]))
    payload = json.loads(files["json"].read_text())
    assert (payload["model"], [m["model"] for m in payload["members"]]) == (" + ".join(paths), paths)
    assert files["report"].read_text().startswith(f"{' + '.join(paths)} on val (PublicTest), tta flip\n")
    with pytest.raises(ModelError, match=r"^an ensemble needs at least 2 models, got 1$"):
        Ensemble(members[:1])


def test_cli_evaluates_an_ensemble_of_a_keras_model_and_an_export(setup, tmp_path):
    """--ensemble of two models: the metrics list both members and the accuracy is the averaged models' (here the
    same model twice in two forms, so the ensemble's predictions are the model's own)."""
    out = tmp_path / "reports"
    proc = run_tool("evaluate", f"--ensemble={setup['keras']},{setup['export']}", f"--data={setup['csv']}",
                    "--split=PublicTest", f"--output_dir={out}", "--tta=tencrop", "--batch_size=8")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads((out / "val_tta-tencrop_metrics.json").read_text())
    assert payload["model_kind"] == "ensemble"
    assert [(m["model"], m["model_kind"], m["crop_size"]) for m in payload["members"]] == [
        (str(setup["keras"]), "keras", 40), (str(setup["export"]), "saved_model", 40)]
    assert payload["confusion_counts"] == EXPECTED_CONFUSION.tolist()
    assert "model: ensemble of 2: " in proc.stdout and "val (PublicTest): accuracy 58.82%" in proc.stdout


def test_an_exports_network_alone_takes_the_views_asked_for(setup, keras_predictor):
    """network_only: the export with flip built in runs as the network it holds, so it takes any TTA and answers
    as the Keras model it was exported from; its metadata and the result still name the views it serves with."""
    from fer_keras.evaluate import _title, evaluate, summary
    from fer_keras.inference import Ensemble, load_predictor

    split = fer_data.load(setup["csv"]).split("val")
    served = load_predictor(setup["export_flip"])
    alone = load_predictor(setup["export_flip"], network_only=True)
    assert (served.built_in_tta, served.network_only) == ("flip", False)
    assert (alone.built_in_tta, alone.network_only, alone.metadata["tta"]) == ("none", True, "flip")
    assert not load_predictor(setup["keras"], network_only=True).network_only
    for tta in ("none", "tencrop"):
        a = evaluate(keras_predictor, split, tta, split_name="val")
        b = evaluate(alone, split, tta, split_name="val")
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-5)
        np.testing.assert_array_equal(b.confusion, a.confusion)
    assert (b.model_kind, b.export_tta, b.network_only, a.network_only) == ("saved_model", "flip", True, False)
    assert "its network alone, without the flip views the export averages" in summary(b)
    mixed = evaluate(Ensemble([keras_predictor, alone]), split, "tencrop", split_name="val")
    assert [(m["export_tta"], m["network_only"]) for m in mixed.members] == [(None, False), ("flip", True)]
    assert mixed.network_only
    assert "each export's network alone, without the views it serves with: level_flip/1 (flip)" in summary(mixed)
    assert _title(mixed, True).startswith("level.keras + level_flip/1 (flip left out) on val (PublicTest)\n")
    np.testing.assert_allclose(mixed.probabilities, a.probabilities, atol=1e-5)


def test_cli_network_only_scores_an_export_with_other_views(setup, tmp_path):
    """--network_only --tta=tencrop on an export served with flip: refused without the flag, written beside the
    served evaluation with it, under its own name."""
    out = tmp_path / "reports"
    args = [f"--data={setup['csv']}", "--split=PublicTest", f"--output_dir={out}", "--tta=tencrop", "--batch_size=8"]
    assert run_tool("evaluate", f"--model={setup['export_flip']}", *args).returncode == 2
    proc = run_tool("evaluate", f"--model={setup['export_flip']}", "--network_only", *args)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"val_tta-tencrop_network-only_{kind}" for kind in ("metrics.json", "predictions.csv", "report.txt",
                                                            "confusion_counts.png", "confusion_normalized.png"))
    payload = json.loads((out / "val_tta-tencrop_network-only_metrics.json").read_text())
    assert (payload["network_only"], payload["export_tta"], payload["tta"]) == (True, "flip", "tencrop")
    assert payload["members"][0]["network_only"] and payload["members"][0]["crop_size"] == 40
    assert payload["confusion_counts"] == EXPECTED_CONFUSION.tolist()
    assert "without the flip views the export averages" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--ensemble={keras},{root}/../{root_name}/level.keras"], "the same model as {keras}"),
    (["--ensemble={keras},/no/such/export"], "/no/such/export: no such model"),
    (["--ensemble={keras}"], "--ensemble needs two or more models"),
    (["--ensemble={keras},"], "--ensemble needs two or more models"),
    (["--ensemble={keras},{export}", "--precise_bn"], "--precise_bn re-estimates one model's statistics"),
    (["--ensemble={keras},{export}", "--model={keras}"], "--model and --ensemble both given"),
    (["--ensemble={keras},{export_flip}", "--tta=flip"], "{export_flip} already averages flip views (the TTA built "
                                                          "into the export); --tta=flip would average views of those"),
])
def test_cli_refuses_a_bad_ensemble_in_one_line(setup, tmp_path, args, message):
    names = {"keras": setup["keras"], "export": setup["export"], "export_flip": setup["export_flip"],
             "root": setup["root"], "root_name": setup["root"].name}
    proc = run_tool("evaluate", *(a.format(**names) for a in args), f"--data={setup['csv']}",
                    f"--output_dir={tmp_path}")
    assert_one_line_error(proc, message.format(**names))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--model=/no/such/model.keras"], "/no/such/model.keras: no such model"),
    (["--split=holdout"], "unknown split 'holdout'"),
    (["--data=", "--split=test"], "has no 'test' split (it has: train, val)"),  # the bundled sample
])
def test_cli_bad_input_is_one_line(setup, tmp_path, args, message):
    proc = run_tool("evaluate", f"--model={setup['keras']}", f"--data={setup['csv']}",
                   f"--output_dir={tmp_path}", *args)
    assert_one_line_error(proc, message)
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_cli_scores_a_course_runs_own_hold_out(tmp_path):
    """train.csv of the course has no PublicTest: --split=val of a run is the hold-out that chose its epoch,
    rebuilt from the run's settings and named so; precise BatchNorm then re-estimates on the run's training part
    only, never on the hold-out's images."""
    from fer_keras import train

    rng = np.random.default_rng(0)
    rows = [f"{i % 7}," + " ".join(map(str, rng.integers(0, 256, IMAGE_SIZE * IMAGE_SIZE))) for i in range(77)]
    data = tmp_path / "train.csv"
    data.write_text("label,feature\n" + "\n".join(rows) + "\n")
    result = train.run(train.TrainConfig(model_dir=str(tmp_path / "run"), data=str(data), export=False,
                                         stem="imagenet", epochs=1, batch_size=32, verbose=0))
    out = tmp_path / "eval"
    proc = run_tool("evaluate", f"--model={result.model_dir}", f"--data={data}", "--split=val",
                    f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    correct = round(result.best_val_accuracy * 7)
    assert f"val (10% stratified hold-out of train): accuracy {correct / 7:.2%} ({correct}/7 images)" in proc.stdout
    proc = run_tool("evaluate", f"--model={result.model_dir}", f"--data={data}", "--split=val", "--precise_bn",
                    f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "re-estimated on 70 images of train (Training) without the run's hold-out, unaugmented" in proc.stdout
    alone = tmp_path / "alone.keras"
    alone.write_bytes((result.model_dir / "best.keras").read_bytes())  # no run to rebuild the hold-out from
    proc = run_tool("evaluate", f"--model={alone}", f"--data={data}", "--split=val", f"--output_dir={out}")
    assert proc.returncode == 2 and "val" in proc.stderr.strip().splitlines()[-1], proc.stderr
    from fer_keras.evaluate import run_holdout

    other = tmp_path / "other" / "train.csv"  # other images: their hold-out is not the one the run chose on
    other.parent.mkdir()
    other.write_text("label,feature\n" + "\n".join(rows[::-1]) + "\n")
    from fer_keras.export import export_from

    export, _ = export_from(result.model_dir, tmp_path / "exports")  # its metadata records the run's data
    for model in (result.model_dir, export):
        with pytest.raises(ConfigError, match=r"other/train.csv: its 10% stratified hold-out differs from the images "
                                              r".* chose its epoch on \(data.json fingerprints\)"):
            run_holdout(fer_data.load(str(other), use_cache=False), "val", [str(model)])
    _, val, label = run_holdout(fer_data.load(str(data)), "val", [str(export)])
    assert label == "val (10% stratified hold-out of train)" and len(val) == 7


def sample_as_course_csv(path: Path) -> Path:
    """The bundled sample's Training rows as a course train.csv (``label,feature``, no PublicTest split)."""
    train = fer_data.load(None).split("train")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("label,feature\n" + "".join(f"{label},{' '.join(map(str, image.ravel()))}\n"
                                                for label, image in zip(train.labels, train.images)))
    return path


def test_the_hold_out_is_not_rebuilt_for_a_model_that_chose_on_public_test(tmp_path):
    """The shipped model chose its epoch on PublicTest and trained on every Training image: a hold-out rebuilt
    from its settings out of Training images (here the bundled sample's, as a course train.csv) would be images it
    trained on, scored as unseen. The sample's Training rows scored 90 % that way."""
    from fer_keras.evaluate import run_holdout

    course = sample_as_course_csv(tmp_path / "train.csv")
    with pytest.raises(ConfigError, match=r"fer_resnet18/\d+: chose its epoch on PublicTest, not on a hold-out of "
                                          r".*train.csv; --split=val there would score images it may have trained on"):
        run_holdout(fer_data.load(str(course), use_cache=False), "val", [None])


def test_an_ensemble_is_never_scored_on_a_members_hold_out(setup, tmp_path):
    """On data without a PublicTest split, --split=val of one model is the hold-out its run chose its epoch on;
    each member of an ensemble may have trained on another's hold-out, so none is rebuilt (the shipped model's
    record, first, is not even read: it would refuse): the tool says why in one line before loading a model."""
    from fer_keras.evaluate import run_holdout
    from fer_keras.inference import resolve

    course = sample_as_course_csv(tmp_path / "course" / "train.csv")
    message = (f"{course}: has no labelled val split, and an ensemble is not scored on a hold-out of train (each "
               "member may have trained on another's); give data with a PublicTest split")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        run_holdout(fer_data.load(str(course), use_cache=False), "val", [None, str(setup["keras"])])
    out = tmp_path / "out"
    proc = run_tool("evaluate", f"--ensemble={resolve(None)[1]},{setup['keras']}", f"--data={course}", "--split=val",
                    f"--output_dir={out}")
    assert_one_line_error(proc, message)
    assert not out.exists()
