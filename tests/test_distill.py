"""Knowledge distillation (train --teachers): the soft targets, their pipeline, and a run that keeps them."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import SMALL_RUN

from fer_keras import NUM_CLASSES, distill, train
from fer_keras.errors import ConfigError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own cache: teachers' probabilities one test cached must not spare another test's pass."""
    monkeypatch.setenv("FER_KERAS_CACHE", str(tmp_path / "cache"))


def _probs(k: int, n: int, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(k, n, NUM_CLASSES)) * 2
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_soft_targets_mix_the_label_with_the_teachers_mean():
    labels = np.array([0, 3, 6, 1, 5])
    probs = _probs(2, 5)
    one_hot = np.eye(NUM_CLASSES)[labels]
    np.testing.assert_allclose(distill.soft_targets(labels, probs, 0.0), one_hot)
    np.testing.assert_allclose(distill.soft_targets(labels, probs, 1.0), probs.mean(axis=0), rtol=1e-6)
    mixed = distill.soft_targets(labels, probs, 0.3)
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(mixed, 0.7 * one_hot + 0.3 * probs.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(distill.soft_targets(labels, probs[0], 1.0), probs[0], rtol=1e-6)  # one teacher


def test_temperature_divides_the_teachers_logits():
    z = np.random.default_rng(1).normal(size=(4, NUM_CLASSES)) * 3
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    for t in (0.5, 1.0, 4.0):
        expected = np.exp(z / t) / np.exp(z / t).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(distill.soften(p, t), expected, rtol=1e-9)
    entropy = [-(q * np.log(q)).sum() for q in (distill.soften(p, t) for t in (0.5, 1.0, 4.0))]
    assert entropy[0] < entropy[1] < entropy[2]


@pytest.mark.parametrize("kwargs, message", [
    ({"weight": 1.5}, r"distill_weight must be in \[0, 1\], got 1.5"),
    ({"temperature": 0.0}, "distill_temperature must be > 0"),
    ({"probabilities": _probs(1, 4)}, r"teacher probabilities of shape \[1, 4, 7\] do not fit 5 labels"),
])
def test_soft_targets_refuse_bad_settings(kwargs, message):
    args = {"labels": np.arange(5), "probabilities": _probs(1, 5), "weight": 0.5, "temperature": 1.0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        distill.soft_targets(**args)


def _split(n: int = 64):
    from fer_keras.data import Split

    rng = np.random.default_rng(2)
    return Split(rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n),
                 np.arange(n))


def test_the_training_stream_carries_each_images_own_soft_target():
    from fer_keras import pipeline
    from fer_keras.augment import AugmentConfig

    split = _split()
    targets = distill.soft_targets(split.labels, _probs(2, len(split), seed=3), 0.6)
    plain = AugmentConfig(flip=False, shift=0, rotation=0, zoom=0, erasing=0)
    ds = pipeline.train_dataset(split, 16, seed=0, epochs=2, augment=plain, targets=targets)
    by_image = {split.images[i].tobytes(): targets[i] for i in range(len(split))}
    seen = 0
    for x, y in ds:
        for image, target in zip(x.numpy(), y.numpy()):
            np.testing.assert_array_equal(target, by_image[image.tobytes()])
            seen += 1
    assert seen == 2 * len(split)
    # One-hot targets give exactly the stream of the labels themselves.
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[split.labels]
    for (xa, ya), (xb, yb) in zip(pipeline.train_dataset(split, 16, 0, 1, targets=one_hot),
                                  pipeline.train_dataset(split, 16, 0, 1), strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("bad", ["shape", "sum", "nan"])
def test_the_training_stream_refuses_targets_that_are_not_distributions(bad):
    from fer_keras import pipeline

    split = _split()
    targets = np.full((len(split), NUM_CLASSES), 1 / NUM_CLASSES, np.float32)
    targets = {"shape": targets[:-1], "sum": targets * 2, "nan": np.where(np.eye(1, NUM_CLASSES, dtype=bool),
                                                                           np.nan, targets)}[bad]
    with pytest.raises(ConfigError, match="targets must be 64 rows of 7 probabilities summing to 1"):
        pipeline.train_dataset(split, 16, 0, 1, targets=targets)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """Two different untrained ResNet-18s as .keras teachers (their probabilities differ per image)."""
    import keras

    from fer_keras.model import resnet18

    root = tmp_path_factory.mktemp("teachers")
    for i, name in enumerate(["a.keras", "b.keras"]):
        keras.utils.set_random_seed(10 + i)
        resnet18("imagenet").save(root / name)
    return root / "a.keras", root / "b.keras"


def _loss_spy(seen: list):
    """The training loss class, keeping every batch's targets, logits and per-image loss as the model is fit."""
    import keras
    import tensorflow as tf

    class Spy(keras.losses.CategoricalCrossentropy):
        def call(self, y_true, y_pred):
            loss = super().call(y_true, y_pred)
            tf.numpy_function(lambda *arrays: seen.append(arrays) or np.float32(0), [y_true, y_pred, loss], tf.float32)
            return loss

    return Spy


def test_a_distilled_run_trains_on_its_teachers_targets_and_keeps_them(teacher_files, tmp_path, capsys, monkeypatch):
    import keras

    a, b = teacher_files
    teacher = tmp_path / "teacher.keras"
    shutil.copy(a, teacher)
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export=False, teachers=(str(teacher), str(b)),
                               distill_weight=0.8, distill_temperature=2.0, **{**SMALL_RUN, "epochs": 1})
    seen: list = []
    with monkeypatch.context() as patch:
        patch.setattr(keras.losses, "CategoricalCrossentropy", _loss_spy(seen))
        result = train.run(config)
    out = capsys.readouterr().out
    assert "distilled from 2 teacher(s) (weight 0.8, temperature 2" in out
    assert out.count("teacher 1/2 ") == 1 and "teacher 2/2 " in out
    assert "running 2 teacher(s) over 128 training images (once per run)" in out

    records = json.loads((result.model_dir / distill.RECORD_FILE).read_text())
    assert [r["path"] for r in records] == [str(teacher.resolve()), str(b.resolve())]
    assert all(len(r["sha256"]) == 64 and 0 <= r["train_accuracy"] <= 1 and r["tta"] == "flip" for r in records)
    stored = distill.load(result.model_dir)
    assert stored.probabilities.shape == (2, SMALL_RUN["max_train_examples"], NUM_CLASSES)
    # The stored probabilities are the teachers' own on the run's training images.
    from fer_keras.data import load
    from fer_keras.inference import load_predictor
    from fer_keras.tta import tta_probabilities

    train_split = train.run_splits(load(), config)[0]
    assert stored.fingerprint == train_split.fingerprint()
    predictor = load_predictor(b)
    flipped = predictor.probabilities(train_split.images[:, :, ::-1])
    np.testing.assert_allclose(stored.probabilities[1], tta_probabilities(predictor, train_split.images, "flip"),
                               atol=1e-5)
    np.testing.assert_allclose(stored.probabilities[1], (predictor.probabilities(train_split.images) + flipped) / 2,
                               atol=1e-5)
    assert "--teachers=" in (result.model_dir / "flags.txt").read_text()

    # The loss label-smooths the soft targets as it does one-hot labels (the recipe that made version 8): each
    # training image's target is 0.9 * [(1 - w) * one-hot + w * teachers] + 0.1 / 7, label_smoothing 0.1.
    assert config.label_smoothing == 0.1
    soft = distill.soft_targets(train_split.labels, stored.probabilities, 0.8, 2.0)
    one_hot = np.eye(NUM_CLASSES)[train_split.labels]
    teachers_mean = distill.soften(stored.probabilities, 2.0).mean(axis=0)
    np.testing.assert_allclose(soft, 0.2 * one_hot + 0.8 * teachers_mean, rtol=1e-6)
    y_true, logits, loss = (np.concatenate(parts) for parts in zip(*seen))
    fitted = ~np.isin(y_true, (0.0, 1.0)).all(axis=1)  # validation batches carry one-hot labels
    assert fitted.sum() == len(train_split) == 128  # one epoch: every training image once, by its own soft target
    assert sorted(map(bytes, y_true[fitted])) == sorted(map(bytes, soft))
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(loss, -((0.9 * y_true + 0.1 / NUM_CLASSES) * log_p).sum(axis=1), rtol=1e-5, atol=1e-6)

    # Rerun of the finished run: the stored probabilities are used, the teachers not run again, even when one of
    # them has meanwhile become another model.
    shutil.copy(b, teacher)
    train.run(config)
    assert "running 2 teacher(s)" not in capsys.readouterr().out
    # Lost probabilities are computed again only from the same models, and other models are refused before the
    # long teacher pass.
    (result.model_dir / distill.TARGETS_FILE).unlink()
    with pytest.raises(ConfigError, match=r"teacher_targets.npz is missing or unreadable and the teachers are not "
                                          r"the models the run started with \(.*teacher.keras changed\)"):
        train.run(config)
    assert "running 2 teacher(s)" not in capsys.readouterr().out
    shutil.copy(a, teacher)
    train.run(config)
    again = distill.load(result.model_dir)
    np.testing.assert_allclose(again.probabilities, stored.probabilities, atol=1e-5)
    assert "from the cache" in capsys.readouterr().out  # computed when the run began, kept in the cache

    # Another run distilled from the same teachers, in another folder, takes their probabilities from the cache.
    other = train.TrainConfig(**{**config.to_json(), "model_dir": str(tmp_path / "other"), "step_epochs": (),
                                 "teachers": (str(b), str(teacher))})
    train.run(other)
    out = capsys.readouterr().out
    assert "running" not in out and out.count("training images from the cache") == 2
    cached = distill.load(tmp_path / "other")
    np.testing.assert_array_equal(cached.probabilities, stored.probabilities[::-1])
    assert [r["train_accuracy"] for r in cached.records] == [r["train_accuracy"] for r in records[::-1]]


def _stored_teachers(folder) -> distill.Teachers:
    teachers = distill.Teachers(_probs(2, 300).astype(np.float32),
                                [{"path": f"t{i}.keras", "sha256": f"{i}" * 64} for i in range(2)], "f" * 64, "flip")
    distill.save(folder, teachers)
    return teachers


@pytest.mark.parametrize("damage", ["cut", "flipped_bytes", "not_a_zip", "npy", "json"])
def test_damaged_stored_targets_are_computed_again_not_a_traceback(tmp_path, damage):
    teachers = _stored_teachers(tmp_path)
    np.testing.assert_array_equal(distill.load(tmp_path).probabilities, teachers.probabilities)
    npz = tmp_path / distill.TARGETS_FILE
    data = npz.read_bytes()
    if damage == "cut":
        npz.write_bytes(data[: len(data) // 2])
    elif damage == "flipped_bytes":
        middle = len(data) // 2
        npz.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    elif damage == "not_a_zip":
        npz.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    elif damage == "npy":  # one array under the .npz name: np.load gives no archive
        with open(npz, "wb") as f:
            np.save(f, teachers.probabilities)
    else:
        (tmp_path / distill.RECORD_FILE).write_text("[{")
    assert distill.load(tmp_path) is None


def test_stored_targets_are_reused_only_for_the_same_teachers_views_and_training_images(tmp_path, monkeypatch):
    # A first attempt that finished no epoch may be rerun on other images of the same count (another seed or
    # hold-out): its stored probabilities belong to the old images and must be computed again.
    stored = _stored_teachers(tmp_path)
    computed = []

    def compute(teachers, images, labels, fingerprint, tta, batch_size):
        computed.append((fingerprint, tta, [t["sha256"] for t in teachers]))
        return distill.Teachers(np.zeros_like(stored.probabilities), [{**t, "train_accuracy": 0.0} for t in teachers],
                                fingerprint, tta)

    monkeypatch.setattr(distill, "compute", compute)
    images, labels = np.zeros((300, 48, 48, 1), np.uint8), np.zeros(300, np.int64)

    def prepare(fingerprint="f" * 64, tta="flip", records=stored.records):
        return distill.prepare(tmp_path, records, images, labels, fingerprint, False, "PublicTest", tta)

    reused, fresh = prepare()
    assert not fresh and not computed
    np.testing.assert_array_equal(reused.probabilities, stored.probabilities)
    assert prepare(fingerprint="e" * 64)[1] and computed[-1][0] == "e" * 64
    assert prepare(tta="tencrop")[1] and computed[-1][1] == "tencrop"
    other = [stored.records[0], {**stored.records[1], "sha256": "9" * 64}]
    assert prepare(records=other)[1] and computed[-1][2] == ["0" * 64, "9" * 64]
    assert len(computed) == 3


def _counting_compute(monkeypatch) -> list:
    """The real :func:`distill.compute`, recording which teachers (paths) it ran."""
    ran, real = [], distill.compute
    monkeypatch.setattr(distill, "compute", lambda teachers, *args: ran.append([t["path"] for t in teachers])
                        or real(teachers, *args))
    return ran


def test_each_teachers_probabilities_are_cached_for_the_same_model_views_and_training_images(
        teacher_files, tmp_path, monkeypatch):
    a, b = (str(p.resolve()) for p in teacher_files)
    split = _split(16)
    ran = _counting_compute(monkeypatch)

    def prepare(folder, teachers, tta="flip", fingerprint=split.fingerprint(), use_cache=True):
        return distill.prepare(tmp_path / folder, teachers, split.images, split.labels, fingerprint, False,
                               "PublicTest", tta, use_cache=use_cache)

    first, fresh = prepare("one", [a, b])
    assert fresh and ran == [[a, b]]
    (tmp_path / "one").mkdir()
    distill.save(tmp_path / "one", first)  # as train does once the run is under way
    assert len(list((tmp_path / "cache" / distill.CACHE_FOLDER).glob("*.npz"))) == 2
    # Another run folder: each teacher's own probabilities, in the new order, none computed.
    second, fresh = prepare("two", [b, a])
    assert fresh and ran == [[a, b]]
    np.testing.assert_array_equal(second.probabilities, first.probabilities[::-1])
    assert [r["tta"] for r in second.records] == ["flip", "flip"]
    assert [r["train_accuracy"] for r in second.records] == [r["train_accuracy"] for r in first.records[::-1]]
    assert all(r["cached"].startswith(str(tmp_path / "cache")) for r in second.records)
    # Other views, other training images, or no cache: computed.
    assert prepare("three", [a], tta="none")[1] and ran[-1] == [a]
    assert prepare("four", [b], fingerprint="e" * 64)[1] and ran[-1] == [b]
    files = sorted((tmp_path / "cache" / distill.CACHE_FOLDER).glob("*.npz"))
    assert len(files) == 4
    assert prepare("five", [a, b], use_cache=False)[1] and ran[-1] == [a, b]
    assert sorted((tmp_path / "cache" / distill.CACHE_FOLDER).glob("*.npz")) == files
    # Only the teacher the cache lacks is computed.
    assert prepare("six", [a, b], tta="none")[1] and ran[-1] == [b]
    assert len(ran) == 5
    # A run's own stored probabilities fill a cache that lacks them (a run made before the cache, a cleared cache).
    shutil.rmtree(tmp_path / "cache" / distill.CACHE_FOLDER)
    assert not prepare("one", [a, b])[1]
    assert len(list((tmp_path / "cache" / distill.CACHE_FOLDER).glob("*.npz"))) == 2
    np.testing.assert_array_equal(prepare("seven", [b, a])[0].probabilities, first.probabilities[::-1])
    assert len(ran) == 5


@pytest.mark.parametrize("damage", ["cut", "other_model", "other_images"])
def test_a_damaged_or_foreign_cache_entry_is_computed_again_with_a_warning(teacher_files, tmp_path, monkeypatch,
                                                                          caplog, damage):
    a = str(teacher_files[0].resolve())
    split = _split(16)
    record = distill.describe_teacher(a)
    distill.prepare(tmp_path / "one", [record], split.images, split.labels, split.fingerprint(), False, "PublicTest")
    entry = distill.cache_path(record, "flip", split.fingerprint())
    if damage == "cut":
        entry.write_bytes(entry.read_bytes()[:100])
    else:  # a readable entry whose contents are not what its name says: the key is checked, not trusted
        with np.load(entry) as f:
            arrays = dict(f)
        if damage == "other_model":
            arrays["sha256"] = np.array("9" * 64)
        else:
            arrays["probabilities"] = _probs(1, len(split) + 1)[0].astype(np.float32)
        with open(entry, "wb") as f:
            np.savez_compressed(f, **arrays)
    ran = _counting_compute(monkeypatch)
    with caplog.at_level("WARNING"):
        teachers, _ = distill.prepare(tmp_path / "two", [record], split.images, split.labels, split.fingerprint(),
                                      False, "PublicTest")
    assert ran == [[a]] and teachers.probabilities.shape == (1, len(split), NUM_CLASSES)
    warned = [m for m in caplog.messages if "teachers' cache" in m]
    assert len(warned) == 1 and warned[0].startswith(
        f"ignoring the unreadable teachers' cache {entry} (" if damage == "cut"
        else f"ignoring the teachers' cache {entry}: it holds other probabilities")
    assert distill.cache_lookup(record, "flip", split.fingerprint(), len(split)) is not None  # written again


def test_a_cache_that_cannot_be_written_is_warned_about_not_an_error(teacher_files, tmp_path, monkeypatch, caplog):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    split = _split(16)
    with caplog.at_level("WARNING"):
        teachers, fresh = distill.prepare(tmp_path / "run", [str(teacher_files[0])], split.images, split.labels,
                                          split.fingerprint(), False, "PublicTest")
    assert fresh and teachers.probabilities.shape == (1, len(split), NUM_CLASSES)
    assert any(m.startswith("could not write the teachers' cache") for m in caplog.messages)


def test_an_exports_own_ten_crop_side_is_part_of_its_cache_key():
    record = {"sha256": "1" * 64, "tta": "tencrop", "crop_size": 40}
    assert distill.cache_path(record, "flip", "f") == distill.cache_path(record, "none", "f")  # its own views
    assert distill.cache_path(record, "flip", "f") != distill.cache_path({**record, "crop_size": 42}, "flip", "f")
    plain = {"sha256": "1" * 64, "tta": "none"}
    assert distill.cache_path(plain, "flip", "f") != distill.cache_path(plain, "tencrop", "f")
    assert distill.cache_path(plain, "flip", "f") != distill.cache_path(plain, "flip", "e")


def test_an_export_teacher_is_run_as_it_serves():
    # --teacher_tta applies to models without TTA of their own: on an export with flip built in (version 6), ten-crop
    # would average ten crops of flip-averaged outputs, views nobody measured.
    from fer_keras.inference import SHIPPED_MODEL, load_predictor
    from fer_keras.tta import tta_probabilities

    split = _split(16)
    served = load_predictor(SHIPPED_MODEL)
    built_in = served.metadata["tta"]
    other = "tencrop" if built_in != "tencrop" else "flip"
    teachers = distill.compute([str(SHIPPED_MODEL)], split.images, split.labels, split.fingerprint(), tta=other)
    assert teachers.records[0]["tta"] == (built_in if built_in != "none" else other)
    assert teachers.records[0]["val_split"] == "PublicTest" and teachers.records[0]["val_accuracy"] > 0.6
    expected = served.probabilities(split.images) if built_in != "none" else tta_probabilities(served, split.images,
                                                                                               other)
    np.testing.assert_allclose(teachers.probabilities[0], expected, atol=1e-6)


def test_other_teachers_are_refused_on_resume_but_not_another_spelling(teacher_files, tmp_path, monkeypatch):
    a, b = teacher_files
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export=False, teachers=(str(a),),
                               **{**SMALL_RUN, "epochs": 1})
    train.run(config)
    with pytest.raises(ConfigError, match=r"other settings \(teachers: \[.*a.keras'\] -> \[.*b.keras'\]\)"):
        train.run(train.TrainConfig(**{**config.to_json(), "teachers": (str(b),), "step_epochs": ()}))
    monkeypatch.chdir(a.parent)
    train.run(train.TrainConfig(**{**config.to_json(), "teachers": ("a.keras",), "step_epochs": ()}))


@pytest.mark.parametrize("change, message", [
    ({"teachers": ("nowhere.keras",)}, r"^--teachers: nowhere.keras: no such model file or directory$"),
    ({"teachers": ("TEACHER",), "distill_weight": 0.0}, "teachers with distill_weight 0 would be run over"),
    ({"distill_temperature": -1.0}, "distill_temperature must be > 0"),
])
def test_bad_teachers_are_refused_before_anything_is_written(teacher_files, tmp_path, change, message):
    change = {**change, "teachers": tuple(str(teacher_files[0]) if t == "TEACHER" else t
                                          for t in change.get("teachers", ()))}
    with pytest.raises(ConfigError, match=message):
        train.run(train.TrainConfig(model_dir=str(tmp_path / "run"), **{**SMALL_RUN, **change}))
    assert not (tmp_path / "run").exists()


def test_a_recipe_names_how_many_teachers_not_where_they_are(tmp_path):
    from fer_keras.model_card import check_recipe_text

    recipe = tmp_path / "r.cfg"
    recipe.write_text("--teachers=saved_models/fer_resnet18/6,runs/x\n--distill_weight=0.5\n")
    check_recipe_text(recipe, "--teachers=/elsewhere/6,/elsewhere/x\n--distill_weight=0.5\n", tmp_path)
    with pytest.raises(ConfigError, match=r"--teachers: recipe 2, run 1 teacher\(s\)"):
        check_recipe_text(recipe, "--teachers=/elsewhere/6\n--distill_weight=0.5\n", tmp_path)


def test_the_card_of_a_distilled_model_names_its_teachers(teacher_files, tmp_path):
    from fer_keras import model_card

    a, b = teacher_files
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                               teachers=(str(a), str(b)), distill_weight=0.75, teacher_tta="none",
                               **{**SMALL_RUN, "epochs": 1, "export_tta": "none"})
    result = train.run(config)
    text = model_card.write_card(result.model_dir, result.export_path.parent, None, None, ("none",)).read_text()
    card = json.loads((result.export_path.parent / model_card.CARD_JSON).read_text())
    records = json.loads((result.model_dir / distill.RECORD_FILE).read_text())
    assert card["training"]["teachers"] == records
    assert ("- distilled: each training target is 0.25 × the one-hot label + 0.75 × the mean probabilities "
            "(temperature 1) of 2 teacher(s), computed once on the un-augmented training images, then label "
            "smoothing 0.1 makes it 0.225 × the label + 0.675 × the teachers' probabilities + 0.01429 on every "
            "class: "
            f"`{a.resolve()}` (TTA none; SHA-256 {records[0]['sha256'][:12]}…), `{b.resolve()}` (TTA none; "
            f"SHA-256 {records[1]['sha256'][:12]}…); the teachers' training time is not all recorded.") in text
    assert card["training"]["wall_seconds_with_teachers"] is None  # bare .keras teachers: how they were trained?
    assert "on augmented batches, against the soft targets' top class)" in text
    (result.model_dir / distill.RECORD_FILE).unlink()  # the record lost: the card still names the paths
    card, _ = model_card.build_card(result.model_dir, result.export_path.parent, None, None, ("none",))
    assert card["training"]["teachers"] == [{"path": str(a)}, {"path": str(b)}]
    assert "`" + str(a) + "` (not recorded beyond its path)" in model_card.render_markdown(card)


@pytest.mark.slow
def test_the_card_keeps_how_its_teachers_were_trained_and_counts_every_run_once(trained_run, tmp_path):
    from fer_keras import model_card
    from fer_keras.history import read_history_csv

    teacher = trained_run[1].model_dir
    # The student starts from its teacher's weights, as the distilled cycle from version 5 did.
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                               init_from=str(teacher), teachers=(str(teacher),), teacher_tta="none",
                               **{**SMALL_RUN, "epochs": 1, "export_tta": "none"})
    result = train.run(config)
    records = json.loads((result.model_dir / distill.RECORD_FILE).read_text())
    assert records[0]["run"]["model_dir"] == str(teacher.resolve()) and records[0]["run"]["epochs"] == 2
    base = result.export_path.parent
    text = model_card.write_card(result.model_dir, base, None, None, ("none",)).read_text()
    card = json.loads((base / model_card.CARD_JSON).read_text())
    assert (base / "teacher1_train_flags.txt").read_text() == (teacher / "flags.txt").read_text()
    assert card["training"]["teachers"][0]["run"]["flags_file"] == "teacher1_train_flags.txt"
    assert "flags" not in card["training"]["teachers"][0]["run"]  # in the file beside the card, not repeated
    walls = [sum(row["seconds"] for row in read_history_csv(d / "history.csv")) for d in (result.model_dir, teacher)]
    # The teacher is also the run the student started from: counted once.
    assert card["training"]["wall_seconds_with_teachers"] == pytest.approx(sum(walls))
    assert (f"(TTA none; PublicTest {100 * records[0]['val_accuracy']:.1f} % at its selection; epoch "
            f"{records[0]['best_epoch']} of a 2-epoch run of {walls[1] / 3600:.2f} h; its flags are in "
            f"`teacher1_train_flags.txt`; SHA-256 {records[0]['sha256'][:12]}…); this run, the runs it started from "
            f"and its teachers' runs (with the runs they started from), each counted once, took "
            f"{sum(walls) / 3600:.2f} h in all.") in text

    # A teacher made by a run that started from another run (here: the student's own run, started from the
    # teacher): the flags of that start go beside the card too, and its wall time is counted once.
    from fer_keras.history import run_record

    original = json.loads(json.dumps(records))
    records[0]["run"] = run_record(result.model_dir)
    (result.model_dir / distill.RECORD_FILE).write_text(json.dumps(records))
    text = model_card.write_card(result.model_dir, base, None, None, ("none",)).read_text()
    card = json.loads((base / model_card.CARD_JSON).read_text())
    assert (base / "teacher1_init_train_flags.txt").read_text() == (teacher / "flags.txt").read_text()
    assert (base / "teacher1_train_flags.txt").read_text() == (result.model_dir / "flags.txt").read_text()
    assert card["training"]["teachers"][0]["run"]["init"]["run"]["flags_file"] == "teacher1_init_train_flags.txt"
    assert "flags" not in card["training"]["teachers"][0]["run"]["init"]["run"]
    assert card["training"]["wall_seconds_with_teachers"] == pytest.approx(sum(walls))
    assert ("started from other weights; its flags are in `teacher1_train_flags.txt`; the flags of the runs "
            "behind its start are in `teacher1_init_train_flags.txt`;") in text
    records = original

    # A teachers.json written before it kept the runs: the card finds the run while the path holds the same model.
    for record in records:
        record.pop("run")
    (result.model_dir / distill.RECORD_FILE).write_text(json.dumps(records))
    card, _ = model_card.build_card(result.model_dir, base, None, None, ("none",))
    assert card["training"]["teachers"][0]["run"]["model_dir"] == str(teacher.resolve())
    records[0]["sha256"] = "0" * 64
    (result.model_dir / distill.RECORD_FILE).write_text(json.dumps(records))
    card, _ = model_card.build_card(result.model_dir, base, None, None, ("none",))
    assert card["training"]["teachers"][0]["run"] is None
    assert card["training"]["wall_seconds_with_teachers"] is None
    assert "the teachers' training time is not all recorded." in model_card.render_markdown(card)
    # A card written again without the teachers' flags removes the stale file of the previous card.
    model_card.write_card(result.model_dir, base, None, None, ("none",))
    assert not (base / "teacher1_train_flags.txt").exists() and not (base / "teacher1_init_train_flags.txt").exists()


HOLD_OUT = "10% stratified hold-out"


@pytest.mark.parametrize("teacher, student, risk", [
    ({"val_split": "PublicTest"}, ("PublicTest", 0.1, 0), None),
    ({"val_split": HOLD_OUT, "run": {"config": {"val_fraction": 0.1, "seed": 3}, "init": None}}, (HOLD_OUT, 0.1, 3),
     None),
    ({"val_split": HOLD_OUT, "run": {"config": {"val_fraction": 0.1}}}, (HOLD_OUT, 0.1, 0), None),  # seed predated
    ({"val_split": "PublicTest"}, (HOLD_OUT, 0.1, 0), f"it was selected on PublicTest, this run selects on {HOLD_OUT}"),
    ({"val_split": HOLD_OUT, "run": {"config": {"val_fraction": 0.1, "seed": 1}}}, (HOLD_OUT, 0.1, 0),
     f"its {HOLD_OUT} was drawn with fraction 0.1 and seed 1, this run's with fraction 0.1 and seed 0"),
    ({"val_split": HOLD_OUT, "run": {"config": {"val_fraction": 0.104, "seed": 0}}}, (HOLD_OUT, 0.1, 0),
     f"its {HOLD_OUT} was drawn with fraction 0.104 and seed 0, this run's with fraction 0.1 and seed 0"),
    ({"val_split": None, "run": None}, ("PublicTest", 0.1, 0), "the split it was selected on is not recorded"),
    ({"val_split": HOLD_OUT, "run": None}, (HOLD_OUT, 0.1, 0),
     f"how its {HOLD_OUT} was drawn (fraction and seed) is not recorded"),
    ({"val_split": HOLD_OUT, "run": {"config": {"val_fraction": 0.1, "seed": 0}}}, (HOLD_OUT, None, None),
     f"how its {HOLD_OUT} was drawn (fraction and seed) is not recorded"),
    ({"val_split": HOLD_OUT, "run": {"config": {"val_fraction": 0.1, "seed": 0, "init_from": "runs/a"}}},
     (HOLD_OUT, 0.1, 0), "it started from other weights (runs/a), whose training images are not known"),
    ({"val_split": HOLD_OUT, "run": {"config": {"val_fraction": 0.1, "seed": 0}, "init": {"path": "b.keras"}}},
     (HOLD_OUT, 0.1, 0), "it started from other weights (b.keras), whose training images are not known"),
])
def test_a_teacher_whose_hold_out_may_differ_from_the_students_is_a_risk(teacher, student, risk):
    assert distill.hold_out_risk(teacher, *student) == risk


def _data(train: str, val: str) -> dict:
    return {"source": "a.csv", "train": {"images": 9, "sha256": train}, "val": {"images": 1, "name": HOLD_OUT,
                                                                              "sha256": val}}


SEED_1 = {"config": {"val_fraction": 0.1, "seed": 1}, "init": None}
SEED_0 = {"config": {"val_fraction": 0.1, "seed": 0}, "init": None}


@pytest.mark.parametrize("teacher, student, risk", [
    # The images' fingerprints decide over the fraction and seed when both sides record them.
    ({"run": SEED_1, "data": _data("t", "v")}, _data("t", "v"), None),
    ({"run": SEED_1, "data": _data("t", "w")}, _data("t", "v"), None),  # same training images: never saw ours
    ({"run": SEED_1, "data": _data("u", "v")}, _data("t", "v"), None),  # selected on our very hold-out
    ({"run": SEED_0, "data": _data("u", "w")}, _data("t", "v"),
     f"its training and {HOLD_OUT} images (of a.csv) are, by their fingerprints, neither this run's training nor "
     f"its {HOLD_OUT} images"),
    ({"run": {**SEED_1, "init": {"path": "b.keras"}}, "data": _data("t", "v")}, _data("t", "v"),
     "it started from other weights (b.keras), whose training images are not known"),
    # One side without fingerprints (an export made before they were kept): the fraction and seed decide.
    ({"run": SEED_1, "data": None}, _data("t", "v"),
     f"its {HOLD_OUT} was drawn with fraction 0.1 and seed 1, this run's with fraction 0.1 and seed 0"),
    ({"run": SEED_0, "data": {"train": {}, "val": {"sha256": "v"}}}, _data("t", "v"), None),
    ({"run": SEED_0, "data": _data("u", "w")}, None, None),
])
def test_recorded_image_fingerprints_decide_a_teachers_hold_out_risk(teacher, student, risk):
    assert distill.hold_out_risk({"val_split": HOLD_OUT, **teacher}, HOLD_OUT, 0.1, 0, student) == risk


def _write_csv(path, usages: dict[str, int]) -> None:
    """A FER2013 CSV of random faces: per class, that many rows of each Usage."""
    rng = np.random.default_rng(5)
    path.write_text("\n".join(["emotion,pixels,Usage"] + [
        f"{c},{' '.join(map(str, rng.integers(0, 256, 2304)))},{usage}"
        for c in range(7) for usage, n in usages.items() for _ in range(n)]) + "\n")


def _run_record(dataset, **settings) -> tuple[dict, dict, object]:
    """A run's config.json and data.json records on ``dataset`` with these settings, and its selection split."""
    config = train.TrainConfig(**settings)
    train_split, val_split, name = train.run_splits(dataset, config)
    data = {"source": dataset.source, "train": {"images": len(train_split), "sha256": train_split.fingerprint()},
            "val": {"images": len(val_split), "name": name, "sha256": val_split.fingerprint()}}
    return config.to_json(), data, val_split


def test_teachers_on_other_subsets_of_the_same_splits_are_no_risk_unlike_ones_that_trained_on_ours(tmp_path):
    """Runs that differ in --max_train_examples and --max_val_examples fingerprint other images of the same
    splits: the teacher's settings rebuild its training images from the student's data, and it is a risk only when
    it trained on images the student selects on (another seed), or on PublicTest rows."""
    from fer_keras import data as fer_data

    _write_csv(tmp_path / "training_only.csv", {"Training": 20})
    dataset = fer_data.load(str(tmp_path / "training_only.csv"), use_cache=False)

    def risk(teacher: dict, student: dict) -> str | None:
        config, data, _ = _run_record(dataset, **teacher)
        ours, our_data, selection = _run_record(dataset, **student)
        record = {"val_split": HOLD_OUT, "run": {"config": config, "init": None}, "data": data}
        return distill.hold_out_risk(record, HOLD_OUT, ours["val_fraction"], ours["seed"], our_data, dataset,
                                     selection)

    assert risk({"max_train_examples": 60, "max_val_examples": 7}, {}) is None
    assert risk({}, {"max_train_examples": 50, "max_val_examples": 5}) is None
    assert risk({"max_train_examples": 60, "max_val_examples": 7}, {"max_train_examples": 50, "max_val_examples": 5},
                ) is None
    assert re.fullmatch(rf"it trained on [1-9]\d* of the 14 images of this run's {HOLD_OUT}",
                        risk({"seed": 1, "max_train_examples": 60, "max_val_examples": 7}, {}))
    # Another data file's fingerprints are not rebuilt from this one: the recorded images decide, as before.
    _write_csv(tmp_path / "other.csv", {"Training": 21})
    config, data, _ = _run_record(fer_data.load(str(tmp_path / "other.csv"), use_cache=False),
                                  max_train_examples=60, max_val_examples=7)
    ours, our_data, selection = _run_record(dataset)
    assert distill.hold_out_risk({"val_split": HOLD_OUT, "run": {"config": config, "init": None}, "data": data},
                                 HOLD_OUT, 0.1, 0, our_data, dataset, selection).startswith("its training and")
    # A teacher trained on a copy whose PublicTest rows are Training rows, with limits, selected on its hold-out.
    _write_csv(tmp_path / "with_public_test.csv", {"Training": 20, "PublicTest": 2})
    student = fer_data.load(str(tmp_path / "with_public_test.csv"), use_cache=False)
    relabelled = tmp_path / "relabelled.csv"
    relabelled.write_text((tmp_path / "with_public_test.csv").read_text().replace(",PublicTest", ",Training"))
    config, data, _ = _run_record(fer_data.load(str(relabelled), use_cache=False), max_train_examples=60,
                                  max_val_examples=7)
    ours, our_data, selection = _run_record(student, max_train_examples=50, max_val_examples=5)
    assert distill.hold_out_risk({"val_split": HOLD_OUT, "run": {"config": config, "init": None}, "data": data},
                                 "PublicTest", 0.1, 0, our_data, student, selection) == (
        f"it was selected on {HOLD_OUT}, this run selects on PublicTest")


def test_a_run_does_not_warn_of_a_teacher_that_trained_on_another_subset_of_its_splits(trained_run, tmp_path,
                                                                                       caplog):
    """train.run gives the check its data: a teacher recorded as trained on this data with other example limits
    (the shared run, relabelled so; its model does not matter here) is not warned about."""
    from fer_keras import data as fer_data

    _write_csv(tmp_path / "training_only.csv", {"Training": 20})
    config, data, _ = _run_record(fer_data.load(str(tmp_path / "training_only.csv"), use_cache=False),
                                  max_train_examples=60, max_val_examples=7)
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_run[1].model_dir, teacher, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    (teacher / "data.json").write_text(json.dumps(data))
    (teacher / "config.json").write_text(json.dumps(config))
    student = train.TrainConfig(model_dir=str(tmp_path / "student"), export=False,
                                data=str(tmp_path / "training_only.csv"), teachers=(str(teacher),),
                                teacher_tta="none", **{**SMALL_RUN, "epochs": 1})
    with caplog.at_level("WARNING"):
        train.run(student)
    assert json.loads((tmp_path / "student" / "data.json").read_text())["val"]["images"] == 14  # all, not 7
    assert not [r.getMessage() for r in caplog.records if "teacher" in r.getMessage()]


def test_a_run_warns_of_a_teacher_that_held_out_other_images(trained_run, tmp_path, caplog):
    # The teacher: a run on data without PublicTest whose 10 % hold-out was drawn with seed 1 (the shared run,
    # relabelled so; its model does not matter here), and a student on such data holding out 10 % with seed 0: a
    # split of the same name, other images, which the teacher may have trained on.
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_run[1].model_dir, teacher, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    record = json.loads((teacher / "data.json").read_text())
    (teacher / "data.json").write_text(json.dumps({**record, "val": {**record["val"], "name": HOLD_OUT}}))
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "seed": 1}))
    rng = np.random.default_rng(5)
    csv = tmp_path / "training_only.csv"
    csv.write_text("\n".join(["emotion,pixels,Usage"] + [
        f"{c},{' '.join(map(str, rng.integers(0, 256, 2304)))},Training" for c in range(7) for _ in range(10)]) + "\n")
    student = train.TrainConfig(model_dir=str(tmp_path / "student"), export=False, data=str(csv), seed=0,
                                teachers=(str(teacher),), teacher_tta="none", **{**SMALL_RUN, "epochs": 1})
    with caplog.at_level("WARNING"):
        train.run(student)
    warnings = [r.getMessage() for r in caplog.records if "teacher" in r.getMessage()]
    # The teacher's data.json fingerprints images of the sample, not of this file: they decide.
    assert warnings == [f"teacher {(teacher / 'best.keras').resolve()}: its training and {HOLD_OUT} images (of "
                        f"{record['source']}) are, by their fingerprints, neither this run's training nor its "
                        f"{HOLD_OUT} images: the teacher may have trained on images this run holds out"]
    # A teacher whose record names its split but fingerprints no images: the seeds its run recorded decide.
    (teacher / "data.json").write_text(json.dumps({"source": record["source"], "train": {},
                                                   "val": {"name": HOLD_OUT}}))
    ours = json.loads((tmp_path / "student" / "data.json").read_text())
    assert distill.hold_out_risk(distill.describe_teacher(str(teacher)), HOLD_OUT, 0.1, 0, ours) == (
        f"its {HOLD_OUT} was drawn with fraction 0.1 and seed 1, this run's with fraction 0.1 and seed 0")
