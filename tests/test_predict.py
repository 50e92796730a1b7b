"""Tests of fer_keras.predict: inputs (course test.csv, image files and folders), output CSV, CLI.

The "level" model predicts the class whose brightness level (LEVELS) is nearest to an image's mean
pixel value, so every expected label is known from how the image was written.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_tool

from fer_keras import CLASS_NAMES, IMAGE_SIZE
from fer_keras.errors import ConfigError, DataError

LEVELS = np.array([20, 55, 90, 125, 160, 195, 230])
# Course test.csv rows: (id, class the image is drawn for). Ids are deliberately not 0..N-1.
TEST_ROWS = [("17", 3), ("4", 0), ("1002", 6), ("x9", 2), ("5", 3)]


def pixels(cls: int) -> str:
    image = np.full((IMAGE_SIZE, IMAGE_SIZE), LEVELS[cls], np.int64)
    image[::2] += 7  # a row pattern with the same mean
    image[1::2] -= 7
    return " ".join(str(v) for v in image.ravel())


def level_model():
    import keras

    centres = LEVELS / 255.0
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1.0 / 255.0)(inputs))
    dense = keras.layers.Dense(7)
    model = keras.Model(inputs, dense(x))
    dense.set_weights([(2 * centres)[None, :].astype(np.float32), (-(centres**2)).astype(np.float32)])
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("predict")
    model_path = root / "level.keras"
    level_model().save(model_path)
    test_csv = root / "test.csv"
    test_csv.write_text("id,feature\n" + "".join(f"{i},{pixels(c)}\n" for i, c in TEST_ROWS))
    images = root / "images"
    images.mkdir()
    for name, cls, size, mode in (("b_sad.png", 4, 48, "L"), ("a_happy.png", 3, 64, "RGB"), ("c_fear.jpg", 2, 48, "L")):
        Image.new(mode, (size, size), (int(LEVELS[cls]),) * (3 if mode == "RGB" else 1)).save(images / name)
    (images / "notes.txt").write_text("not an image\n")
    labelled_csv = root / "fer2013.csv"
    labelled_csv.write_text("emotion,pixels,Usage\n" + "".join(f"{c},{pixels(c)},PublicTest\n" for _, c in TEST_ROWS))
    return {"root": root, "model": model_path, "test_csv": test_csv, "images": images, "labelled_csv": labelled_csv}


@pytest.fixture(scope="module")
def predictor(setup):
    from fer_keras.inference import load_predictor

    return load_predictor(setup["model"])


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_course_test_csv_keeps_ids_and_order(setup, predictor, tmp_path):
    from fer_keras.predict import load_inputs, write_predictions
    from fer_keras.tta import tta_probabilities

    split, description = load_inputs(str(setup["test_csv"]))
    assert split.ids.tolist() == [i for i, _ in TEST_ROWS]
    assert description.startswith("test of ")  # the course's test split, not FER2013's PrivateTest
    probabilities = tta_probabilities(predictor, split.images, "flip")
    out = write_predictions(tmp_path / "sub" / "predictions.csv", split.ids, probabilities)
    rows = read_rows(out)
    assert rows == [["id", "label"]] + [[i, str(c)] for i, c in TEST_ROWS]
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]  # no temporary file left


def test_a_course_folders_test_csv_is_predicted_without_reading_its_train_csv(setup, tmp_path):
    """A bad row in train.csv stopped the prediction of test.csv, which never uses it (and every prediction parsed
    the 28,709 training rows); asked for, the train split still names the row."""
    import shutil

    from fer_keras.predict import load_inputs

    folder = tmp_path / "course"
    folder.mkdir()
    shutil.copy(setup["test_csv"], folder / "test.csv")
    (folder / "train.csv").write_text(f"label,feature\n3,{pixels(3)}\n9,{pixels(2)}\n")
    for split in (None, "test", "PrivateTest"):
        chosen, description = load_inputs(str(folder), split)
        assert chosen.ids.tolist() == [i for i, _ in TEST_ROWS] and description == f"test of {folder / 'test.csv'}"
    with pytest.raises(DataError, match=r"course/train.csv: line 3: label 9 is outside 0-6"):
        load_inputs(str(folder), "train")


def test_a_bad_row_is_left_out_with_skip_bad_rows_and_the_others_keep_their_ids(setup, tmp_path):
    from fer_keras.predict import load_inputs

    lines = Path(setup["test_csv"]).read_text().splitlines()
    bad_id = lines[2].split(",")[0]
    lines[2] = f"{bad_id},1 2 3"
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test.csv: line 3: expected 2304 pixels"):
        load_inputs(str(tmp_path / "test.csv"))
    split, _ = load_inputs(str(tmp_path / "test.csv"), skip_bad_rows=True)
    assert split.ids.tolist() == [i for i, _ in TEST_ROWS if i != bad_id]


def test_image_inputs(setup):
    from fer_keras.predict import load_inputs

    folder, description = load_inputs(str(setup["images"]))
    assert folder.ids.tolist() == ["a_happy.png", "b_sad.png", "c_fear.jpg"]  # notes.txt is ignored
    assert folder.images.shape == (3, 48, 48, 1) and "3 image(s)" in description
    assert abs(int(folder.images[0].mean()) - LEVELS[3]) <= 1  # RGB 64x64 converted

    listed, _ = load_inputs(f"{setup['images'] / 'c_fear.jpg'},{setup['images'] / 'b_sad.png'}")
    assert listed.ids.tolist() == ["c_fear.jpg", "b_sad.png"]
    single, _ = load_inputs(str(setup["images"] / "b_sad.png"))
    assert single.ids.tolist() == ["b_sad.png"] and (single.labels == -1).all()
    twice = f"{setup['images'] / 'b_sad.png'},{setup['images'] / 'c_fear.jpg'},{setup['images'] / '.' / 'b_sad.png'}"
    with pytest.raises(ConfigError, match=r"b_sad.png: named twice in --data"):
        load_inputs(twice)
    with pytest.raises(DataError, match="missing.png: no such image file"):
        load_inputs(f"{setup['images'] / 'b_sad.png'},{setup['images'] / 'missing.png'}")
    with pytest.raises(DataError, match="images: a folder; a list names image files"):
        load_inputs(f"{setup['images'] / 'b_sad.png'},{setup['images']}")


def test_images_of_the_same_name_in_two_folders_keep_their_paths_as_ids(setup, tmp_path):
    """A submission row must lead back to one file: when names repeat, every id is the path as given."""
    import shutil

    from fer_keras.predict import load_inputs

    for folder in ("monday", "tuesday"):
        (tmp_path / folder).mkdir()
        shutil.copy(setup["images"] / "b_sad.png", tmp_path / folder / "face.png")
    shutil.copy(setup["images"] / "c_fear.jpg", tmp_path / "other.jpg")
    named = [tmp_path / "monday" / "face.png", tmp_path / "tuesday" / "face.png", tmp_path / "other.jpg"]
    split, _ = load_inputs(",".join(map(str, named)))
    assert split.ids.tolist() == [str(p) for p in named]


def test_unreadable_images_are_left_out_with_skip_bad_rows_in_folders_and_lists(setup, tmp_path):
    import shutil

    from fer_keras.predict import load_inputs

    folder = tmp_path / "faces"
    shutil.copytree(setup["images"], folder)
    (folder / "broken.png").write_bytes(b"not a png")
    for spec in (str(folder), f"{folder / 'broken.png'},{folder / 'b_sad.png'}"):
        with pytest.raises(DataError, match=r"broken.png: unreadable image"):
            load_inputs(spec)
        split, description = load_inputs(spec, skip_bad_rows=True)
        assert "broken.png" not in split.ids.tolist() and "b_sad.png" in split.ids.tolist()
        assert description.startswith(f"{len(split)} image")
    with pytest.raises(DataError, match=r"none of the 1 image file\(s\) could be read; first: .*broken.png"):
        load_inputs(f"{folder / 'broken.png'},", skip_bad_rows=True)


def test_a_comma_in_a_path_and_hidden_files_in_a_folder(setup, tmp_path):
    """A file or folder whose name holds a comma is that one path, not a list; a folder's hidden files (macOS' ``._``
    AppleDouble companions, which are no images) are not read."""
    import shutil

    from fer_keras.predict import load_inputs

    folder = tmp_path / "faces, monday"
    shutil.copytree(setup["images"], folder)
    (folder / "._a_happy.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    split, _ = load_inputs(str(folder))
    assert split.ids.tolist() == ["a_happy.png", "b_sad.png", "c_fear.jpg"]
    single, _ = load_inputs(str(shutil.copy(setup["images"] / "b_sad.png", tmp_path / "me, sad.png")))
    assert single.ids.tolist() == ["me, sad.png"]


def test_a_flat_folder_names_the_sub_folders_it_does_not_read(setup, tmp_path, caplog):
    import shutil

    from fer_keras.predict import load_inputs

    folder = tmp_path / "faces"
    shutil.copytree(setup["images"], folder)
    shutil.copytree(setup["images"], folder / "scratch")
    split, _ = load_inputs(str(folder))
    assert len(split) == 3
    assert "sub-folder(s) scratch are not read" in caplog.text


def test_a_flat_folder_names_what_it_leaves_out(setup, tmp_path, caplog):
    """A link to an image that is gone is an unreadable image, named (left out and reported with --skip_bad_rows);
    a photo under a suffix fer_keras does not read (.heic) is named as not read. Both were dropped silently, so a
    submission lacked their rows; a folder of such photos alone was reported as a layout without class folders."""
    import shutil

    from fer_keras.predict import load_inputs

    folder = tmp_path / "faces"
    folder.mkdir()
    shutil.copy(setup["images"] / "b_sad.png", folder / "a.png")
    (folder / "b.png").symlink_to(tmp_path / "gone.png")
    (folder / "c.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(DataError, match=r"faces/b.png: "):
        load_inputs(str(folder))
    split, _ = load_inputs(str(folder), skip_bad_rows=True)
    assert split.ids.tolist() == ["a.png"]
    assert re.search(r"skipped 1 unreadable image\(s\): .*faces/b.png", caplog.text)
    assert "faces: 1 file(s) c.heic not read: not an image suffix fer_keras reads (.jpg, .jpeg, " in caplog.text
    only = tmp_path / "phone"
    only.mkdir()
    for k in range(7):
        (only / f"IMG_{k}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(DataError, match=r"^\S*phone: holds no image under a suffix fer_keras reads \(\.jpg, .*\), "
                       r"only 7 file\(s\) IMG_0.HEIC, IMG_1.HEIC, IMG_2.HEIC, IMG_3.HEIC, IMG_4.HEIC \(and 2 more\)$"):
        load_inputs(str(only))


@pytest.mark.parametrize("name", ["face.jfif", "face.pgm", "face.dat"])
def test_an_image_is_never_parsed_as_a_csv(setup, tmp_path, name):
    """A known image suffix is read as an image; an image under another suffix is named as one, not reported as a
    CSV with an unrecognised header."""
    from PIL import Image

    from fer_keras.predict import load_inputs

    path = tmp_path / name
    Image.new("L", (48, 48), int(LEVELS[4])).save(path, format="PPM" if name.endswith((".pgm", ".dat")) else "JPEG")
    if name.endswith(".dat"):
        with pytest.raises(DataError, match=r"face.dat: a PPM image, but .dat is not an image suffix fer_keras reads"):
            load_inputs(str(path))
    else:
        split, _ = load_inputs(str(path))
        assert split.ids.tolist() == [name] and abs(int(split.images.mean()) - LEVELS[4]) <= 1


def test_an_image_too_large_to_open_under_another_suffix_is_named_as_one(tmp_path):
    """Pillow refuses to open a 200-megapixel image (a decompression bomb); under an unlisted suffix that ended in
    a traceback instead of naming the file as an image."""
    from fer_keras.predict import load_inputs

    path = tmp_path / "huge.dat"
    path.write_bytes(b"P5\n20000 10000\n255\n")
    with pytest.raises(DataError, match=r"^\S*huge.dat: a very large image, but .dat is not an image suffix fer_keras "
                       r"reads \(\.jpg, "):
        load_inputs(str(path))


def test_split_choice(tmp_path):
    from fer_keras.predict import load_inputs

    path = tmp_path / "fer2013.csv"
    path.write_text("emotion,pixels,Usage\n" + "".join(
        f"{c},{pixels(c)},{usage}\n" for c, usage in ((1, "Training"), (2, "PublicTest"), (5, "PublicTest"))))
    with pytest.raises(ConfigError, match="has splits train, val; choose one with --split"):
        load_inputs(str(path))
    split, description = load_inputs(str(path), "PublicTest")
    assert len(split) == 2 and description.startswith("val (PublicTest)")
    with pytest.raises(DataError, match="has no 'test' split"):
        load_inputs(str(path), "test")
    everything = tmp_path / "all.csv"  # FER2013 as distributed: its PrivateTest rows are the ones predicted
    everything.write_text("emotion,pixels,Usage\n" + "".join(
        f"{c},{pixels(c)},{usage}\n" for c, usage in ((1, "Training"), (2, "PublicTest"), (5, "PrivateTest"))))
    split, description = load_inputs(str(everything))
    assert len(split) == 1 and description.startswith("test (PrivateTest)")


def test_write_predictions_with_probabilities(tmp_path):
    from fer_keras.predict import atomic_write, write_predictions

    probs = np.array([[0.1, 0.0, 0.0, 0.7, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.8]])
    out = write_predictions(tmp_path / "p.csv", np.array(["a", "b"]), probs, with_probabilities=True)
    rows = read_rows(out)
    assert rows[0] == ["id", "label"] + [f"prob_{n}" for n in CLASS_NAMES]
    assert rows[1][:2] == ["a", "3"] and rows[2][:2] == ["b", "6"]
    np.testing.assert_allclose(np.array(rows[1][2:], float), probs[0])
    with pytest.raises(ConfigError, match="is a directory"):
        atomic_write(tmp_path, "x")


def test_the_tools_default_outputs_in_the_repository_are_kept_out_of_git():
    """Run from the repository, predict writes predictions.csv beside .gitignore (and the other tools their
    reports); none of them should turn up in git status."""
    import shutil
    import subprocess

    from fer_keras import benchmark, evaluate, predict, report, saliency

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    folders = (evaluate.DEFAULT_OUTPUT_DIR, report.DEFAULT_OUTPUT_DIR, saliency.DEFAULT_OUTPUT_DIR)
    outputs = [predict.DEFAULT_OUTPUT, benchmark.DEFAULT_OUTPUT, *(f"{d}/x" for d in folders)]
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *outputs], cwd=REPO,
                          capture_output=True, text=True)
    assert not [line for line in proc.stdout.splitlines() if line.startswith("::")], proc.stdout


def test_cli_writes_submission(setup, tmp_path):
    out = tmp_path / "submission.csv"
    proc = run_tool("predict", f"--model={setup['model']}", f"--data={setup['test_csv']}", f"--output={out}",
                   "--probabilities", "--tta=tencrop")
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert rows[0][:2] == ["id", "label"] and len(rows[0]) == 9
    assert [r[:2] for r in rows[1:]] == [[i, str(c)] for i, c in TEST_ROWS]
    np.testing.assert_allclose([sum(map(float, r[2:])) for r in rows[1:]], 1.0, atol=1e-4)
    assert f"wrote {len(TEST_ROWS)} predictions for test of {setup['test_csv']} (tta: tencrop)" in proc.stdout
    assert "predicted classes: happy 2, angry 1, fear 1, neutral 1\n" in proc.stdout  # most frequent first


@pytest.mark.parametrize("args, message", [
    (["--model=/no/such/dir"], "/no/such/dir: no such model file or directory"),
    (["--split=holdout"], "unknown split 'holdout'"),
    (["--data=/no/such/test.csv"], "/no/such/test.csv: no such file or directory"),
])
def test_cli_bad_input_is_one_line(setup, tmp_path, args, message):
    out = tmp_path / "p.csv"
    proc = run_tool("predict", f"--model={setup['model']}", f"--data={setup['test_csv']}", f"--output={out}", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_cli_names_the_views_an_export_averages_itself(setup, tmp_path):
    from fer_keras.export import export_model

    export = export_model(level_model(), tmp_path / "exports", "level", tta="flip")
    out = tmp_path / "p.csv"
    proc = run_tool("predict", f"--model={export}", f"--data={setup['test_csv']}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    assert f"(tta: flip, built into the export) to {out}" in proc.stdout
    assert [r[:2] for r in read_rows(out)[1:]] == [[i, str(c)] for i, c in TEST_ROWS]


def test_cli_a_truncated_export_is_one_line(setup, trained_run, tmp_path):
    import shutil

    _, source = trained_run
    export = tmp_path / "my_resnet18" / "1"
    shutil.copytree(source.export_path, export)
    data_file, = (export / "variables").glob("variables.data-*")
    data_file.write_bytes(data_file.read_bytes()[:1000])  # a copy cut short
    out = tmp_path / "p.csv"
    proc = run_tool("predict", f"--model={export}", f"--data={setup['test_csv']}", f"--output={out}")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip()
    assert last.startswith(f"error: {export}: cannot load SavedModel (Read less bytes"), proc.stderr
    assert "\n" not in last, proc.stderr  # one line: no TensorFlow start-up or loader lines before it
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("tool", ["predict", "evaluate"])
def test_an_output_that_cannot_be_created_is_refused_before_the_model_runs(setup, tmp_path, tool):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would be\n")
    flag, target = ("--output", blocker / "p.csv") if tool == "predict" else ("--output_dir", blocker / "eval")
    data = setup["test_csv"] if tool == "predict" else setup["labelled_csv"]
    proc = run_tool(tool, f"--model={setup['model']}", f"--data={data}", f"{flag}={target}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {target}: cannot be created, {blocker} is a file; choose another {flag}"
    assert "model:" not in proc.stdout  # refused before loading anything
    assert blocker.read_text() == "a file where a folder would be\n"


def test_an_output_file_name_ending_in_a_slash_is_refused(tmp_path):
    """``--output=newdir/`` wrote a file named newdir (Path drops the slash); an existing folder is named as one."""
    from fer_keras.predict import check_output

    with pytest.raises(ConfigError, match=r"^\S*/newdir/: ends in /, so it names a folder, expected an output file "
                       r"name; choose another --output$"):
        check_output(f"{tmp_path}/newdir/")
    with pytest.raises(ConfigError, match=r"^\S*: is a directory, expected an output file name; choose another"):
        check_output(f"{tmp_path}/")
    assert list(tmp_path.iterdir()) == []


def test_output_never_replaces_the_input_or_a_model(setup, tmp_path):
    """--output naming the data (or any file that is not an earlier predictions CSV) is refused before anything
    is read; an earlier predictions CSV is replaced."""
    import shutil

    data = shutil.copy(setup["test_csv"], tmp_path / "test.csv")
    before = Path(data).read_bytes()
    proc = run_tool("predict", f"--model={setup['model']}", f"--data={data}", f"--output={data}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {data}: exists and is not a predictions CSV (its first line is not "
                                   "id,label...); choose another --output or remove the file"), proc.stderr
    assert Path(data).read_bytes() == before
    from fer_keras.predict import check_output

    with pytest.raises(ConfigError, match="level.keras: exists and is not a predictions CSV"):
        check_output(setup["model"])
    windows = tmp_path / "excel.csv"  # an earlier submission saved again with Windows line ends
    windows.write_bytes(b"id,label\r\n0,3\r\n")
    check_output(windows)
    out = tmp_path / "predictions.csv"
    out.write_text("id,label\n0,3\n")  # an earlier submission, then one with probabilities: each is replaced
    for extra in (["--probabilities"], []):
        proc = run_tool("predict", f"--model={setup['model']}", f"--data={data}", f"--output={out}", *extra)
        assert proc.returncode == 0, proc.stderr
        header = read_rows(out)[0]
        assert header[:2] == ["id", "label"] and len(header) == (9 if extra else 2)
    assert read_rows(out) == [["id", "label"]] + [[i, str(c)] for i, c in TEST_ROWS]


def test_image_names_that_are_not_utf8_keep_their_bytes(setup, predictor, tmp_path):
    """File names from archives made elsewhere (Latin-1 bytes) are read and written back byte for byte."""
    import os
    import shutil

    from fer_keras.predict import load_inputs, write_predictions
    from fer_keras.tta import tta_probabilities

    folder = tmp_path / "faces"
    folder.mkdir()
    try:
        shutil.copy(setup["images"] / "b_sad.png", os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 file names")
    shutil.copy(setup["images"] / "c_fear.jpg", folder / "d.jpg")
    split, _ = load_inputs(str(folder))
    out = write_predictions(tmp_path / "p.csv", split.ids, tta_probabilities(predictor, split.images))
    assert out.read_bytes() == b"id,label\ncaf\xe9.png,4\nd.jpg,2\n"


@pytest.mark.parametrize("encoding, shown", [("utf-8", b"caf\xe9.png"), ("ascii", b"caf\\udce9.png")])
def test_cli_names_a_file_that_is_not_utf8_on_a_strict_stdout(setup, tmp_path, encoding, shown):
    """A UTF-8 locale's stdout is strict: naming an output whose name is not UTF-8 ended a finished run in a
    traceback. A UTF-8 stdout writes the name's own bytes, another escapes them; the run succeeds."""
    import os
    import shutil
    import subprocess
    import sys

    out = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png.csv")
    try:
        image = shutil.copy(setup["images"] / "b_sad.png", os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 file names")
    env = dict(os.environ, PYTHONIOENCODING=f"{encoding}:strict", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "fer_keras.predict", f"--model={setup['model']}", f"--data={image}",
                           f"--output={out}"], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"wrote 1 predictions for " in proc.stdout
    assert f" to {os.fsencode(tmp_path).decode()}/".encode() + shown + b".csv\n" in proc.stdout
    assert Path(out).read_bytes() == b"id,label\ncaf\xe9.png,4\n"


def test_a_model_that_is_not_a_fer_classifier_is_refused_in_one_line(setup, tmp_path):
    """A model of other input or output shape, or a SavedModel that fer_keras did not export, is a one-line error
    naming it, not a traceback or a CSV of misread outputs (exporting one would regroup its outputs into rows of 7)."""
    import keras

    from fer_keras.errors import ModelError
    from fer_keras.export import export_model

    ten = keras.Sequential([keras.Input((48, 48, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    ten.save(tmp_path / "ten.keras")
    rgb = keras.Sequential([keras.Input((48, 48, 3)), keras.layers.Flatten(), keras.layers.Dense(7)])
    rgb.save(tmp_path / "rgb.keras")
    level_model().export(str(tmp_path / "foreign"), verbose=False)  # Keras' own SavedModel: its input is not pixels
    cases = [("ten.keras", "the model outputs shape (None, 10), not [N, 7] logits"),
             ("rgb.keras", "the model takes input of shape (None, 48, 48, 3), not [N, 48, 48, 1]"),
             ("foreign", "serving_default takes keras_tensor")]
    from fer_keras.inference import load_predictor

    for name, message in cases[:2]:  # in this process; the CLI turns the same error into its line (below)
        with pytest.raises(ModelError) as refused:
            load_predictor(tmp_path / name)
        assert str(refused.value).startswith(f"{tmp_path / name}: {message}")
    name, message = cases[2]
    out = tmp_path / f"{name}.csv"
    proc = run_tool("predict", f"--model={tmp_path / name}", f"--data={setup['test_csv']}", f"--output={out}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(f"error: {tmp_path / name}: {message}"), proc.stderr  # its only line
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ModelError, match="outputs shape"):
        export_model(ten, tmp_path / "exports", "ten")
    assert not (tmp_path / "exports" / "ten" / "1").exists()
