"""TF Serving exports: run without fer_keras, through saved_model_cli, atomically, never overwritten."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, distinct_batchnorm, run_tool

from fer_keras import CLASS_NAMES
from fer_keras.errors import ConfigError
from fer_keras.export import export_model, next_version
from fer_keras.model import resnet18

REPO = Path(__file__).resolve().parents[1]

FRESH_PROCESS = textwrap.dedent("""
    import sys
    # The serving side needs neither our code nor Keras: TensorFlow (as TF Serving) runs the graph.
    for blocked in ("fer_keras", "keras", "tf_keras"):
        sys.modules[blocked] = None
    try:
        import fer_keras  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("fer_keras was importable")
    import numpy as np, tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    x = np.load(sys.argv[2])
    out = loaded.signatures["serving_default"](pixels=tf.constant(x.astype("float32")))
    out8 = loaded.signatures["serving_uint8"](pixels=tf.constant(x.astype("uint8")))
    empty = loaded.signatures["serving_default"](pixels=tf.zeros([0, 48, 48, 1]))
    np.savez(sys.argv[3], probabilities=out["probabilities"].numpy(), logits=out["logits"].numpy(),
             class_id=out["class_id"].numpy(), class_name=out["class_name"].numpy().astype(str),
             probabilities8=out8["probabilities"].numpy(),
             **{f"empty_{k}": v.numpy().astype(str) if v.dtype == tf.string else v.numpy() for k, v in empty.items()})
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = resnet18("imagenet", dropout=0.2)
    distinct_batchnorm(model)
    x = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 1)).astype("uint8")
    np.save(root / "x.npy", x.astype("float32"))
    path = export_model(model, root / "models", "fer", tta="none")
    logits = np.asarray(model(x.astype("float32"), training=False))
    return root, path, x, logits


def test_export_runs_in_a_process_that_cannot_import_fer_keras_or_keras(exported, tmp_path):
    root, path, x, logits = exported
    args = [sys.executable, "-c", FRESH_PROCESS, str(path), str(root / "x.npy"), str(tmp_path / "o.npz")]
    proc = subprocess.run(args, env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(tmp_path / "o.npz")
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    # Float32 rounding relative to the logits' size (an untrained network's are large); softmax moves no
    # probability by more than its logits move.
    tolerance = 1e-5 * max(1.0, np.abs(logits).max())
    assert np.abs(out["logits"] - logits).max() <= tolerance
    assert np.abs(out["probabilities"] - probabilities).max() <= tolerance
    assert np.abs(out["probabilities8"] - probabilities).max() <= tolerance
    np.testing.assert_array_equal(out["class_id"], logits.argmax(1))
    assert list(out["class_name"]) == [CLASS_NAMES[i] for i in logits.argmax(1)]
    assert path.name == "1" and path.parent.name == "fer"
    # An empty request gets empty answers (oneDNN's strided convolution alone would fail on it).
    assert out["empty_probabilities"].shape == out["empty_logits"].shape == (0, 7)
    assert out["empty_class_id"].shape == out["empty_class_name"].shape == (0,)


def test_the_export_refuses_pixels_that_are_not_grey_levels(exported):
    """NaN, infinities and values outside 0-255 are an error the client sees (TF Serving's INVALID_ARGUMENT),
    not confident predictions from garbage."""
    import tensorflow as tf

    root, path, x, logits = exported
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    for bad in (np.nan, np.inf, -1.0, 255.5):
        pixels = x.astype("float32")
        pixels[1, 5, 7, 0] = bad
        with pytest.raises(tf.errors.InvalidArgumentError, match="pixels must be raw grey levels in 0-255"):
            serve(pixels=tf.constant(pixels))
    edges = x.astype("float32")
    edges[0, 0, 0, 0], edges[0, 0, 1, 0] = 0.0, 255.0
    assert serve(pixels=tf.constant(edges))["probabilities"].shape == (len(x), 7)


def test_saved_model_cli_runs_the_export(exported, tmp_path):
    root, path, x, logits = exported
    show = subprocess.run(["saved_model_cli", "show", "--dir", str(path), "--all"], env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    assert "serving_default" in show.stdout and "serving_uint8" in show.stdout
    run = subprocess.run(
        ["saved_model_cli", "run", "--dir", str(path), "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"pixels={root / 'x.npy'}", "--outdir", str(tmp_path / "out")],
        env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "out" / "logits.npy")
    assert np.abs(got - logits).max() <= 1e-5 * max(1.0, np.abs(logits).max())
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "class_id.npy"), logits.argmax(1))


def test_versions_are_added_never_overwritten(tmp_path):
    model = resnet18("imagenet")
    first = export_model(model, tmp_path, "m")
    second = export_model(model, tmp_path, "m")
    assert (first.name, second.name) == ("1", "2")
    stamp = (first / "saved_model.pb").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="never overwritten"):
        export_model(model, tmp_path, "m", version=1)
    assert (first / "saved_model.pb").stat().st_mtime_ns == stamp
    meta = json.loads((second / "assets.extra" / "fer_keras.json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES)
    from fer_keras.inference import resolve

    assert resolve(tmp_path / "m") == ("saved_model", second)  # the tools take the newest version
    (tmp_path / "m" / "10").mkdir()
    (tmp_path / "m" / "10" / "saved_model.pb").write_bytes((second / "saved_model.pb").read_bytes())
    assert resolve(tmp_path / "m") == ("saved_model", tmp_path / "m" / "10")  # by number: 10 after 2
    # A new export must be the newest, or TF Serving keeps serving version 10: 11, not 3 (after 1 and 2) or 4.
    assert next_version(tmp_path / "m") == 11
    (tmp_path / "m" / "12").mkdir()  # a version still being copied in: no saved_model.pb yet
    assert resolve(tmp_path / "m") == ("saved_model", tmp_path / "m" / "10")


def test_a_file_named_like_a_version_is_passed_over_not_a_reason_to_refuse(tmp_path):
    """A stray file ``1`` (not a version: TF Serving reads folders) cannot be overwritten by a folder either; the next
    automatic version is 2, where the export was refused with "version 1 exists" although none was asked for."""
    import keras

    inputs = keras.Input((48, 48, 1))
    model = keras.Model(inputs, keras.layers.Dense(7, name="logits")(keras.layers.Flatten()(inputs)))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "1").write_text("notes")
    assert export_model(model, tmp_path, "m") == tmp_path / "m" / "2"
    assert (tmp_path / "m" / "1").read_text() == "notes"


def test_a_model_folder_resolves_to_its_highest_numbered_version_only(tmp_path):
    """Folders named by other digits (``²``, which int() refuses; ``٣٣``, which int() reads as 33 but TF Serving
    passes over) are no versions, to the tools as to a new export's number; the highest plain number is used."""
    from fer_keras.export import existing_versions
    from fer_keras.inference import resolve

    for version in ("2", "10", "²", "٣٣", "v11"):
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "saved_model.pb").write_bytes(b"")
    assert resolve(tmp_path / "m") == ("saved_model", tmp_path / "m" / "10")
    assert existing_versions(tmp_path / "m") == [2, 10]


@pytest.mark.parametrize("automatic", [True, False], ids=["next-free-version", "named-version"])
def test_a_version_taken_by_another_export_meanwhile(tmp_path, monkeypatch, automatic):
    """Two exports at once: the one that finishes second moves to the next free version, or, for a version the
    user named, stops with a one-line error; neither overwrites the other."""
    import keras

    archive_class = type(keras.export.ExportArchive())
    write_out = archive_class.write_out

    def another_export_finishes_first(self, path, *args, **kwargs):
        write_out(self, path, *args, **kwargs)
        (tmp_path / "m" / "1").mkdir()
        (tmp_path / "m" / "1" / "saved_model.pb").write_text("the other export")

    monkeypatch.setattr(archive_class, "write_out", another_export_finishes_first)
    if automatic:
        assert export_model(resnet18("imagenet"), tmp_path, "m").name == "2"
    else:
        with pytest.raises(ConfigError, match=r"m/1: export version 1 was written by another export meanwhile"):
            export_model(resnet18("imagenet"), tmp_path, "m", version=1)
    assert (tmp_path / "m" / "1" / "saved_model.pb").read_text() == "the other export"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == (["1", "2"] if automatic else ["1"])


def test_a_failed_write_leaves_no_version_behind(tmp_path, monkeypatch):
    import keras

    archive_class = type(keras.export.ExportArchive())  # the backend class
    write_out = archive_class.write_out
    written = []

    def fails_after_writing(self, path, *args, **kwargs):
        write_out(self, path, *args, **kwargs)  # the SavedModel is on disk, half a version in the making ...
        written.append(Path(path))
        raise OSError("disk full")  # ... when the metadata write fails

    monkeypatch.setattr(archive_class, "write_out", fails_after_writing)
    with pytest.raises(OSError, match="disk full"):
        export_model(resnet18("imagenet"), tmp_path, "m")
    assert written and written[0].parent == tmp_path / "m" and not written[0].exists()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == []


def test_every_weight_is_stored_once(exported):
    # keras-team/keras#23553: ExportArchive.track() made the SavedModel hold each weight twice.
    import tensorflow as tf

    root, path, x, logits = exported
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    stored = sum(int(np.prod(shape)) for name, shape in reader.get_variable_to_shape_map().items()
                 if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"))
    model = resnet18("imagenet", dropout=0.2)
    assert stored == sum(int(np.prod(v.shape)) for v in model.variables)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 50e6, size  # the shipped-model budget: 50 MB


def test_only_dead_local_writers_leftovers_are_removed(tmp_path):
    import os
    import socket

    from fer_keras.history import remove_dead_writers_tmp

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = [f".tmp-3-{host}-{dead.pid}", f".tmp-4-{host}-{os.getpid()}", ".tmp-5-elsewhere-1", "2",
             f".tmp-6-other-{host}-{dead.pid}"]  # host "other-HOST", not this one
    for name in names:
        (tmp_path / name).mkdir()
    files = [f".tmp-best-{host}-{dead.pid}.keras", f".tmp-best-{host}-{os.getpid()}.keras", "best.keras"]
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    assert remove_dead_writers_tmp(tmp_path) == [tmp_path / names[0]]
    assert remove_dead_writers_tmp(tmp_path, ".keras") == [tmp_path / files[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:] + files[1:])


def test_flip_tta_export_averages_the_mirror_image(tmp_path):
    model = resnet18("imagenet")
    distinct_batchnorm(model)
    x = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 1)).astype("float32")
    path = export_model(model, tmp_path, "m", tta="flip")
    import tensorflow as tf

    out = tf.saved_model.load(str(path)).signatures["serving_default"](pixels=tf.constant(x))
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    logits, mirrored = np.asarray(model(x)), np.asarray(model(x[:, :, ::-1]))
    expected = (softmax(logits) + softmax(mirrored)) / 2
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    # Probabilities may saturate, so show with the logits that the mirror image was averaged in.
    assert not np.allclose(mirrored, logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out["logits"].numpy(), (logits + mirrored) / 2, rtol=1e-4, atol=1e-3)


def mirror_sensitive_classifier():
    """48x48 pixels -> 7 logits: (0, 10, 0, -30, ...) for an image brighter on its left half, (0, -20, -1, -30, ...)
    for its mirror image. Flip TTA then averages the probabilities to ~(0.37, 0.50, 0.13, 0, ...): class 1, where
    averaging the logits, (0, -5, -0.5, -30, ...), would give class 0."""
    import keras

    side = np.where(np.arange(48) < 24, 1.0, -1.0) / (24 * 48 * 255)
    left_minus_right = np.broadcast_to(side[None, :], (48, 48)).reshape(-1)
    inputs = keras.Input((48, 48, 1))
    hidden = keras.layers.Dense(2, activation="relu", use_bias=False)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(7, name="logits")(hidden))
    model.layers[2].set_weights([np.stack([left_minus_right, -left_minus_right], axis=1)])
    kernel = np.array([[0, 10, 0, -30, -30, -30, -30], [0, -20, -1, -30, -30, -30, -30]], np.float32)
    model.layers[3].set_weights([kernel, np.zeros(7, np.float32)])
    return model


def test_flip_tta_serves_the_class_of_the_averaged_probabilities(tmp_path):
    """A known answer: the served probabilities are the mean of the image's and its mirror image's softmax, and
    class_id / class_name their argmax, in both signatures."""
    import tensorflow as tf

    model = mirror_sensitive_classifier()
    x = np.zeros((2, 48, 48, 1), np.float32)
    x[0, :, :24] = 255  # brighter on the left
    x[1] = 128  # symmetric: all its logits are 0 (class 0), so rows of different images cannot pass for each other
    logits = np.asarray(model(np.concatenate([x, x[:, :, ::-1]])))
    np.testing.assert_allclose(logits[0], [0, 10, 0, -30, -30, -30, -30], atol=1e-4)
    np.testing.assert_allclose(logits[2], [0, -20, -1, -30, -30, -30, -30], atol=1e-4)
    e = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = e / e.sum(1, keepdims=True)
    expected = (probabilities[:2] + probabilities[2:]) / 2
    path = export_model(model, tmp_path, "m", tta="flip")
    loaded = tf.saved_model.load(str(path))
    for signature, pixels in (("serving_default", x), ("serving_uint8", x.astype(np.uint8))):
        out = loaded.signatures[signature](pixels=tf.constant(pixels))
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(out["logits"].numpy(), (logits[:2] + logits[2:]) / 2, atol=1e-4)
        assert out["class_id"].numpy().tolist() == [1, 0]
        assert out["class_name"].numpy().astype(str).tolist() == [CLASS_NAMES[1], CLASS_NAMES[0]]
    assert expected[0, 1] == pytest.approx(0.5, abs=1e-4) and expected[0].argmax() == 1
    assert ((logits[0] + logits[2]) / 2).argmax() == 0  # averaged logits would name class 0


NO_TTA_PROCESS = textwrap.dedent("""
    import sys
    for blocked in ("fer_keras", "keras", "tf_keras"):
        sys.modules[blocked] = None
    import numpy as np, tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    x = tf.constant(np.load(sys.argv[2]))
    plain, served = loaded.signatures["serving_no_tta"](pixels=x), loaded.signatures["serving_default"](pixels=x)
    empty = loaded.signatures["serving_no_tta"](pixels=tf.zeros([0, 48, 48, 1]))
    try:
        loaded.signatures["serving_no_tta"](pixels=tf.fill([1, 48, 48, 1], 300.0))
    except tf.errors.InvalidArgumentError as e:
        refused = "pixels must be raw grey levels in 0-255" in str(e)
    else:
        refused = False
    np.savez(sys.argv[3], logits=plain["logits"].numpy(), probabilities=plain["probabilities"].numpy(),
             served_logits=served["logits"].numpy(), empty=empty["probabilities"].numpy(), refused=refused,
             signatures=sorted(loaded.signatures))
""")


@pytest.mark.parametrize("tta", ["flip", "tencrop"])
def test_an_export_with_tta_also_serves_the_image_alone(tmp_path, tta):
    """serving_no_tta: one forward pass per image for clients that need the speed, with the same input checks,
    in a process that cannot import fer_keras or Keras; an export without TTA has no such extra signature."""
    model = resnet18("imagenet")
    distinct_batchnorm(model)
    x = np.random.default_rng(3).integers(0, 256, (4, 48, 48, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    path = export_model(model, tmp_path / "models", "m", tta=tta)
    proc = subprocess.run([sys.executable, "-c", NO_TTA_PROCESS, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "o.npz")], env=cli_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(tmp_path / "o.npz")
    logits = np.asarray(model(x, training=False))
    tolerance = 1e-5 * max(1.0, np.abs(logits).max())
    assert np.abs(out["logits"] - logits).max() <= tolerance
    e = np.exp(logits - logits.max(1, keepdims=True))
    assert np.abs(out["probabilities"] - e / e.sum(1, keepdims=True)).max() <= tolerance
    assert not np.allclose(out["served_logits"], logits, rtol=1e-3, atol=1e-3)  # the default keeps its TTA
    assert out["empty"].shape == (0, 7) and bool(out["refused"])
    assert {"serving_default", "serving_uint8", "serving_no_tta"} <= set(out["signatures"])
    assert json.loads((path / "assets.extra" / "fer_keras.json").read_text())["signatures"] == [
        "serving_default", "serving_uint8", "serving_no_tta"]
    import tensorflow as tf

    plain = export_model(model, tmp_path / "models", "plain", tta="none")
    assert "serving_no_tta" not in tf.saved_model.load(str(plain)).signatures


def test_tencrop_export_serves_the_evaluate_tools_ten_crop(tmp_path):
    from fer_keras.inference import load_predictor
    from fer_keras.tta import tta_probabilities

    model = resnet18("imagenet")
    x = np.random.default_rng(2).integers(0, 256, (3, 48, 48, 1)).astype("float32")
    path = export_model(model, tmp_path, "m", tta="tencrop")
    import tensorflow as tf

    out = tf.saved_model.load(str(path)).signatures["serving_uint8"](pixels=tf.constant(x.astype("uint8")))

    class KerasProbabilities:
        def probabilities(self, images, batch_size=256):
            return tf.nn.softmax(model(images)).numpy()

    expected = tta_probabilities(KerasProbabilities(), x, "tencrop")
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    # An untrained network's probabilities may saturate, so tell the views apart by their logits.
    assert not np.allclose(out["logits"].numpy(), np.asarray(model(x)), rtol=1e-3, atol=1e-3)
    assert out["class_id"].shape == (3,) and out["logits"].shape == (3, 7)
    predictor = load_predictor(path)
    assert predictor.metadata["tta"] == "tencrop" and predictor.metadata["crop_size"] == 40


@pytest.mark.parametrize("crop", [41, 43])
def test_an_odd_ten_crop_is_served_as_the_evaluate_tool_computes_it(tmp_path, crop):
    """48 - crop odd: the centre window cannot sit in the middle. Every path floors its offset, (48 - crop) // 2: the
    export's served views and the evaluate tool's, on a .keras model and on an export's network alone. (torchvision's
    CenterCrop rounds half to even instead: 4 for 41, 2 for 43; fer_keras has no twin of TTA to compare with it.)"""
    import keras
    import tensorflow as tf

    from fer_keras.inference import Predictor, load_predictor
    from fer_keras.tta import tta_probabilities

    keras.utils.set_random_seed(4)
    inputs = keras.Input((48, 48, 1))
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(7)(keras.layers.Flatten()(scaled)))  # a weight per pixel
    x = np.random.default_rng(7).integers(0, 256, (3, 48, 48, 1)).astype("float32")
    far = 48 - crop
    windows = [x[:, top:top + crop, left:left + crop] for top, left in
               [(0, 0), (0, far), (far, 0), (far, far), (far // 2, far // 2)]]
    seen = [tf.image.resize(w, (48, 48), method="bilinear").numpy() for w in windows]
    expected = np.mean([tf.nn.softmax(model(v)).numpy() for v in seen + [v[:, :, ::-1] for v in seen]], axis=0)
    path = export_model(model, tmp_path, "m", tta="tencrop", crop_size=crop)
    served = load_predictor(path)
    assert served.metadata["crop_size"] == crop
    np.testing.assert_allclose(served.probabilities(x), expected, atol=1e-5)
    for evaluated in (Predictor("keras", tmp_path / "m.keras", keras_model=model),
                      load_predictor(path, network_only=True)):
        np.testing.assert_allclose(tta_probabilities(evaluated, x, "tencrop", crop), expected, atol=1e-5)


def test_export_cli_from_a_run_dir_and_refusing_an_existing_version(trained_run, tmp_path):
    config, result = trained_run
    args = [sys.executable, "-m", "fer_keras.export", f"--model={config.model_dir}",
            f"--export_dir={tmp_path}", "--name=cli", "--tta=flip"]
    ok = subprocess.run(args, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "cli" / "1" / "saved_model.pb").is_file()
    info = json.loads((tmp_path / "cli" / "1" / "assets.extra" / "fer_keras.json").read_text())
    assert info["tta"] == "flip" and info["train_config"]["stem"] == config.stem
    assert info["best_epoch"] == result.best_epoch
    assert info["val_accuracy"] == pytest.approx(result.best_val_accuracy, abs=5e-6)  # history.csv's 6 digits
    # The split that accuracy was measured on, and the images it trained and selected on, as training's own export
    # records them (distill.hold_out_risk compares a teacher's with its student's).
    record = json.loads((Path(config.model_dir) / "data.json").read_text())
    assert info["val_split"] == record["val"]["name"]
    assert info["data"] == record
    assert json.loads((result.export_path / "assets.extra" / "fer_keras.json").read_text())["data"] == record
    # Refused before --tta=auto spends minutes measuring the model.
    again = subprocess.run(args + ["--version=1", "--tta=auto"], env=cli_env(tmp_path), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error:") and "never overwritten" in again.stderr
    assert "Traceback" not in again.stderr and "TTA chosen" not in again.stdout


def test_a_mixed_precision_model_is_exported_in_float32():
    import keras

    from fer_keras.model import as_float32

    float32 = resnet18("imagenet")
    assert as_float32(float32) is float32  # nothing to convert: no copy
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = resnet18("imagenet")
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.set_weights(float32.get_weights())
    converted = as_float32(mixed)
    assert converted is not mixed
    assert {layer.dtype_policy.name for layer in converted.layers} == {"float32"}
    x = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1)).astype("float32")
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(float32(x)), rtol=1e-5, atol=1e-5)


def test_a_mixed_precision_best_keras_is_measured_as_its_export_serves_it(tmp_path):
    """evaluate/predict/the model card and --export_tta=auto read a bf16 run's best.keras in float32, so their
    figures are the served ones (in bfloat16 they differed from the export by a few PublicTest images)."""
    import keras

    from fer_keras.inference import load_predictor

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = resnet18("cifar_pool", dropout=0.2)
    finally:
        keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(1)
    # Weights far from the initial ones, so bfloat16 and float32 logits visibly differ.
    mixed.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in mixed.get_weights()])
    mixed.save(tmp_path / "best.keras")
    export = export_model(mixed, tmp_path / "exports", "m", 1)
    x = rng.integers(0, 256, (8, 48, 48, 1)).astype("float32")
    keras_predictor, served = load_predictor(tmp_path / "best.keras"), load_predictor(export)
    assert {layer.dtype_policy.name for layer in keras_predictor.keras_model.layers} == {"float32"}
    served_logits = served.logits(x)
    scale = np.abs(served_logits).max()  # the perturbed weights give logits of ~1e4: tolerances relative to it
    assert np.abs(keras_predictor.logits(x) - served_logits).max() <= 1e-5 * scale  # float32 round-off only
    as_trained = np.asarray(mixed(x, training=False), np.float32)
    assert np.abs(as_trained - served_logits).max() > 1e-3 * scale  # bfloat16 differs: the check above can fail

def test_export_from_a_mixed_precision_run_chooses_its_tta_in_float32_on_the_runs_own_data(tmp_path, monkeypatch):
    """--tta=auto of the export tool: the float32 model (as served), the run's data read as the run read it
    (here with --skip_bad_rows), and the run's folder as the export's name, not "best"."""
    import keras
    from conftest import write_challenge_csv

    from fer_keras import export as export_lib
    from fer_keras.history import write_history_csv
    from fer_keras.train import TrainConfig
    from fer_keras.tta import TTA_MODES

    csv = tmp_path / "fer.csv"
    write_challenge_csv(csv, n_val_per_class=2)
    with open(csv, "a") as f:
        f.write("3,1 2 3,Training\n")  # three pixels: a bad row the run skipped
    run = tmp_path / "myrun"
    run.mkdir()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        resnet18("imagenet").save(run / "best.keras")
    finally:
        keras.config.set_dtype_policy("float32")
    (run / "config.json").write_text(json.dumps({**TrainConfig().to_json(), "data": str(csv), "skip_bad_rows": True,
                                                 "precision": "mixed_bfloat16"}))
    write_history_csv(run / "history.csv", [{"epoch": 1, "loss": 1.9, "accuracy": 0.2, "val_loss": 1.8,
                                             "val_accuracy": 0.25, "learning_rate": 0.1, "seconds": 1.0}])
    seen = {}
    real = export_lib.resolve_tta

    def spy(model, tta, split, *args, **kwargs):
        seen.update(policies={layer.dtype_policy.name for layer in model.layers}, images=len(split))
        return real(model, tta, split, *args, **kwargs)

    monkeypatch.setattr(export_lib, "resolve_tta", spy)
    path, tta = export_lib.export_from(run / "best.keras", tmp_path / "exports", tta="auto")
    assert path == tmp_path / "exports" / "myrun" / "1" and tta in TTA_MODES
    assert seen == {"policies": {"float32"}, "images": 14}  # PublicTest: 2 rows per class


def test_auto_tta_keeps_the_most_accurate_crop_side_and_the_first_of_equals(monkeypatch):
    import fer_keras.tta as tta

    labels = np.arange(10) % 7
    right = {("none", None): 5, ("flip", None): 6, ("tencrop", 36): 6, ("tencrop", 40): 7, ("tencrop", 44): 9,
             ("tencrop", 48): 9}  # images each view set gets right

    def probabilities(predictor, images, mode, crop_size, batch_size):
        predicted = labels.copy()
        predicted[right[(mode, crop_size if mode == "tencrop" else None)]:] += 1
        return np.eye(8)[predicted][:, :7]

    monkeypatch.setattr(tta, "tta_probabilities", probabilities)
    images = np.zeros((10, 48, 48, 1), np.uint8)
    choice = tta.choose_tta(object(), images, labels, "val", crop_size=[36, 40, 44, 48, 44], tolerance=0)
    assert (choice.mode, choice.crop_size) == ("tencrop", 44)  # 44 and 48 tie: the first given
    assert choice.accuracy == {"none": 0.5, "flip": 0.6, "tencrop": 0.9}
    assert choice.to_json()["tencrop_by_crop_size"] == {"36": 0.6, "40": 0.7, "44": 0.9, "48": 0.9}
    assert "ten-crop with 36-pixel crops 60.00 %, 40-pixel crops 70.00 %, 44-pixel crops 90.00 %, 48-pixel crops " \
           "90.00 %, 44 kept)" in choice.summary()
    one = tta.choose_tta(object(), images, labels, "val", crop_size=40, tolerance=0)
    assert (one.crop_size, one.accuracy["tencrop"]) == (40, 0.7) and "tencrop_by_crop_size" not in one.to_json()


def test_auto_tta_prefers_the_cheaper_mode_within_the_tolerance():
    from fer_keras.tta import cheapest_within

    shipped_like = {"none": 0.598, "flip": 0.606, "tencrop": 0.607}
    assert cheapest_within(shipped_like, 0.25) == "flip"
    assert cheapest_within(shipped_like, 0.0) == "tencrop"
    assert cheapest_within(shipped_like, 1.0) == "none"
    assert cheapest_within({"none": 0.70, "flip": 0.69, "tencrop": 0.71}, 0.5) == "tencrop"


def test_export_cli_auto_tta_repeats_the_training_runs_choice(trained_run, tmp_path):
    config, result = trained_run
    proc = run_tool("export", f"--model={config.model_dir}", f"--export_dir={tmp_path}", "--name=auto",
                    "--tta=auto", env=cli_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_cli = json.loads((tmp_path / "auto" / "1" / "assets.extra" / "fer_keras.json").read_text())
    by_train = json.loads((result.export_path / "assets.extra" / "fer_keras.json").read_text())
    assert f"TTA chosen on PublicTest ({by_train['tta_selection']['num_images']} images)" in proc.stdout
    assert by_cli["tta"] == by_train["tta"]
    for mode, accuracy in by_train["tta_selection"]["accuracy"].items():
        assert by_cli["tta_selection"]["accuracy"][mode] == pytest.approx(accuracy, abs=1e-9)


def test_export_cli_auto_tta_defaults_to_the_data_the_run_was_trained_on(trained_run, tmp_path):
    from conftest import write_challenge_csv

    config, _ = trained_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.keras", "history.csv"):
        shutil.copy(Path(config.model_dir) / name, run / name)
    recorded = json.loads((Path(config.model_dir) / "config.json").read_text())
    write_challenge_csv(tmp_path / "fer2013.csv", n_val_per_class=3)
    (run / "config.json").write_text(json.dumps({**recorded, "data": str(tmp_path / "fer2013.csv")}))
    proc = run_tool("export", f"--model={run / 'best.keras'}", f"--export_dir={tmp_path}", "--name=auto",
                    "--tta=auto", env=cli_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TTA chosen on PublicTest (21 images)" in proc.stdout


@pytest.mark.slow
def test_export_cli_auto_tta_keeps_the_most_accurate_crop_side(trained_run, tmp_path, monkeypatch):
    """--tta=auto with several --crop_size sides measures ten-crop with each (the evaluate tool's figures), keeps
    the most accurate, records every side's figure, and builds that side in when ten-crop is chosen."""
    from fer_keras import inference
    from fer_keras.evaluate import evaluate
    from fer_keras.export import export_from, selection_split

    config, result = trained_run
    (tmp_path / "damaged.keras").write_bytes(b"PK\x03\x04 not a whole zip")  # refused before the model is read
    with pytest.raises(ConfigError, match=r"^ten-crop crop sides 40, 42: several are measured only with --tta=auto; "
                                          r"give one with --tta=tencrop$"):
        export_from(tmp_path / "damaged.keras", tmp_path, tta="tencrop", crop_size=[40, 42])
    proc = run_tool("export", f"--model={config.model_dir}", f"--export_dir={tmp_path}", "--name=sides",
                    "--tta=auto", "--crop_size=36,40,44", "--tta_tolerance=100", env=cli_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "sides" / "1" / "assets.extra" / "fer_keras.json").read_text())
    chosen = meta["tta_selection"]
    val, _, _ = selection_split(None, json.loads((Path(config.model_dir) / "config.json").read_text()))
    best = inference.load_predictor(Path(config.model_dir) / "best.keras")
    by_side = {c: evaluate(best, val, "tencrop", split_name="val", crop_size=c).accuracy for c in (36, 40, 44)}
    assert chosen["tencrop_by_crop_size"] == pytest.approx({str(c): a for c, a in by_side.items()}, abs=1e-9)
    kept = max(by_side, key=by_side.get)
    assert chosen["crop_size"] == kept and chosen["accuracy"]["tencrop"] == pytest.approx(by_side[kept], abs=1e-9)
    assert chosen["chosen"] == meta["tta"] == "none"  # a tolerance of 100 points: the cheapest mode
    assert f"ten-crop with 36-pixel crops {100 * by_side[36]:.2f} %, 40-pixel crops" in proc.stdout
    assert f", {kept} kept)" in proc.stdout
    # When ten-crop is chosen, the kept side is the one served.
    import fer_keras.tta

    monkeypatch.setattr(fer_keras.tta, "cheapest_within", lambda accuracy, tolerance: "tencrop")
    path, tta = export_from(config.model_dir, tmp_path, "sides", tta="auto", crop_size=[36, 40, 44])
    assert tta == "tencrop" and inference.export_metadata(path)["crop_size"] == kept
    served = evaluate(inference.load_predictor(path), val, "none", split_name="val")
    assert served.accuracy == pytest.approx(by_side[kept], abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--tta=tencrop", "--crop_size=40,42"], "several --crop_size sides are measured only with --tta=auto"),
    (["--crop_size=0"], "--crop_size must be one or more whole numbers in 1-48"),
    (["--crop_size=40,x"], "--crop_size must be one or more whole numbers in 1-48"),
    (["--crop_size=4\u00b2"], "--crop_size must be one or more whole numbers in 1-48"),
    (["--tta=auto", "--tta_tolerance=-1"], "--tta_tolerance must be >= 0"),
    (["--name= "], "--name must be a plain folder name"),  # was exported into a folder named " "
    (["--export_dir="], "--export_dir must name a folder"),  # an unset $EXPORTS: exported into the current directory
])
def test_export_cli_refuses_bad_flags_in_one_line(tmp_path, args, message):
    proc = run_tool("export", "--model=x.keras", *args, env=cli_env(tmp_path))
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["under_a_file", "name_is_a_file"])
def test_an_export_folder_that_cannot_be_made_is_refused_before_the_model_loads(tmp_path, where):
    """An --export_dir under a file, or a file where the name's folder would go, is named in one line before the
    model is read (the model here is damaged, so reading it first would blame it instead)."""
    from fer_keras.errors import ConfigError
    from fer_keras.export import export_from

    (tmp_path / "damaged.keras").write_bytes(b"PK\x03\x04 not a whole zip")
    (tmp_path / "file").write_text("a file\n")
    export_dir, obstacle = {"under_a_file": (tmp_path / "file" / "exports", "file is a file"),
                            "name_is_a_file": (tmp_path, "file: exists and is not a directory")}[where]
    with pytest.raises(ConfigError, match=rf"{obstacle}.*; choose another --export_dir or --name$"):
        export_from(tmp_path / "damaged.keras", export_dir, name="file", tta="auto")
    assert (tmp_path / "file").read_text() == "a file\n"


def test_a_missing_model_is_named_as_missing(tmp_path):
    """Not Keras' "File format not supported" (it would send the user looking at the file's format)."""
    from fer_keras.errors import FerError
    from fer_keras.export import load_for_export

    with pytest.raises(FerError, match=r"/missing: no such model file or directory$"):
        load_for_export(tmp_path / "missing")


def test_export_cli_names_the_export_after_the_keras_file(tmp_path):
    resnet18("imagenet").save(tmp_path / "smiles.keras")
    proc = subprocess.run([sys.executable, "-m", "fer_keras.export", f"--model={tmp_path / 'smiles.keras'}",
                           f"--export_dir={tmp_path / 'out'}"], env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "smiles" / "1" / "saved_model.pb").is_file()


def test_a_crop_models_ten_crop_shows_it_the_five_windows_pixel_for_pixel(tmp_path):
    """--input_crop: ten-crop's windows are the model's own size, each seen exactly (not resized), served as the
    evaluate tool computes it, and the export says so."""
    from fer_keras.inference import Predictor, load_keras, load_predictor
    from fer_keras.tta import crop_offsets, tta_probabilities

    crop, margin = 32, 8
    model = resnet18("imagenet", input_crop=crop)
    distinct_batchnorm(model)
    x = np.random.default_rng(5).integers(0, 256, (3, 48, 48, 1)).astype("float32")
    path = export_model(model, tmp_path, "m", tta="tencrop")
    import tensorflow as tf

    served = tf.saved_model.load(str(path)).signatures["serving_default"](pixels=tf.constant(x))
    canvases = []
    for top, left in crop_offsets(crop):
        window = x[:, top:top + crop, left:left + crop]
        for seen in (window, window[:, :, ::-1]):
            canvas = np.zeros_like(x)  # the model's crop takes the centre; the rest must not matter
            canvas[:, margin:margin + crop, margin:margin + crop] = seen
            canvases.append(canvas)
    expected = np.mean([tf.nn.softmax(model(c)).numpy() for c in canvases], axis=0)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    keras_side = tta_probabilities(Predictor("keras", tmp_path / "m.keras", keras_model=model), x, "tencrop")
    np.testing.assert_allclose(keras_side, expected, atol=1e-5)
    predictor = load_predictor(path)
    assert predictor.metadata["input_crop"] == crop and predictor.metadata["crop_size"] == crop
    assert predictor.input_crop == crop and load_keras(path).get_layer("input_crop").cropping == ((8, 8), (8, 8))


def test_an_export_rebuilds_as_the_same_keras_model(exported):
    from fer_keras.inference import load_keras

    root, path, x, logits = exported
    model = load_keras(path)
    assert model.get_layer("stage4_block2").__class__.__name__ == "BasicBlock"
    np.testing.assert_allclose(np.asarray(model(x.astype("float32"), training=False)), logits, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("damage", ["keras_model.json", "saved_model.pb"])
def test_a_damaged_export_is_a_one_line_model_error(exported, tmp_path, damage):
    from fer_keras.errors import ModelError
    from fer_keras.inference import load_keras

    _, path, _, _ = exported
    copy = tmp_path / "1"
    shutil.copytree(path, copy)
    target = copy / "assets.extra" / damage if damage.endswith(".json") else copy / damage
    target.write_bytes(b"\x00 not what it should be")
    with pytest.raises(ModelError, match="cannot rebuild the Keras model") as error:
        load_keras(copy)
    assert "\n" not in str(error.value)
    # What a user of a gradient tool sees: that line, exit status 2, no traceback, nothing written.
    out = tmp_path / "saliency_out"
    proc = run_tool("saliency", f"--model={copy}", f"--output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {error.value}"
    assert not out.exists()


def test_atomic_writes_clean_up_their_dead_writers_leftovers(tmp_path):
    """A writer killed between creating its temporary file and renaming it leaves a hidden file; the next write
    of the same target removes it (a live writer's or another target's is kept) and leaves no temporary."""
    import os
    import socket

    from fer_keras.history import atomic_write_text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = f".tmp-history.csv.k3x9ab_1-{host}-{dead.pid}"
    kept = [f".tmp-history.csv.a1b2cd34-{host}-{os.getpid()}", f".tmp-config.json.c3d4ef56-{host}-{dead.pid}",
            f".tmp-history.csv.bak.e5f6gh78-{host}-{dead.pid}",  # another target's, although its name starts alike
            f".tmp-history.csv.k3x9ab_1-other-{host}-{dead.pid}"]  # host "other-HOST", not this one
    for name in [stale, *kept]:
        (tmp_path / name).write_text("half")
    atomic_write_text(tmp_path / "history.csv", "epoch\n1\n")
    assert (tmp_path / "history.csv").read_text() == "epoch\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["history.csv"])


def test_atomic_writes_clean_up_hour_old_leftovers_of_the_old_naming(tmp_path):
    """``.NAME.tmp-RANDOM`` (before session 13) does not say who wrote it: the next write of that target removes it
    once it is an hour old (a write takes seconds), and keeps a younger one and another target's."""
    import os
    import time as time_lib

    from fer_keras.history import atomic_write_text

    old, young, other = ".history.csv.tmp-ab12cd34", ".history.csv.tmp-ef56gh78", ".config.json.tmp-ij90kl12"
    hour_ago = time_lib.time() - 3700
    for name in (old, young, other):
        (tmp_path / name).write_text("half")
    for name in (old, other):
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    atomic_write_text(tmp_path / "history.csv", "epoch\n1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young, other, "history.csv"])
    figure = tmp_path / ".history.png.tmp-mn34op56.png"  # plot_history's old temporaries kept the suffix
    figure.write_bytes(b"half")
    os.utime(figure, (hour_ago, hour_ago))
    atomic_write_text(tmp_path / "history.png", b"png")
    assert not figure.exists()


def test_export_auto_tta_refuses_data_other_than_the_runs(trained_run, tmp_path):
    """A TTA chosen on other images would be recorded as chosen on the run's PublicTest."""
    from conftest import write_challenge_csv

    from fer_keras.errors import ConfigError
    from fer_keras.export import export_from

    config, _ = trained_run
    write_challenge_csv(tmp_path / "other.csv", n_val_per_class=10)
    with pytest.raises(ConfigError, match=r"other.csv: its PublicTest images differ from those .* chose its epoch on "
                                          r"\(data.json\); pass the data the run was trained on as --data"):
        export_from(config.model_dir, tmp_path / "exports", tta="auto", data=str(tmp_path / "other.csv"))
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("damage, message", [
    (b"[1, 2]", "expected a JSON object"),
    (b'{"stem": "imag', "unreadable: "),
    ('{"stem": "\u00e9"}'.encode("latin-1"), "unreadable: 'utf-8' codec can't decode"),
])
def test_a_runs_damaged_config_json_is_named_instead_of_ignored(trained_run, tmp_path, monkeypatch, damage,
                                                                message):
    """Exporting a run records its settings, and --tta=auto rebuilds its selection split from them; the tools read
    its crop and data options there too. Dropped silently, a damaged config.json sent the user after the data
    (and a JSON list crashed the report); now the file is named, and nothing is exported, before the model is
    loaded."""
    import shutil

    from fer_keras import export, inference
    from fer_keras.errors import ConfigError
    from fer_keras.export import export_from

    def no_load(path):
        raise AssertionError(f"loaded {path} before refusing its run's config.json")

    monkeypatch.setattr(export, "load_for_export", no_load)

    config, _ = trained_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.keras", "history.csv", "data.json"):
        shutil.copy(Path(config.model_dir) / name, run / name)
    (run / "config.json").write_bytes(damage)
    pattern = re.escape(f"{run / 'config.json'}: {message}")
    with pytest.raises(ConfigError, match=pattern):
        export_from(str(run), tmp_path / "exports", tta="none")
    assert not (tmp_path / "exports").exists()
    with pytest.raises(ConfigError, match=pattern):
        inference.training_config("keras", run / "best.keras", inference.find_run_dir(run))
