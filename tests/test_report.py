"""Tests of fer_keras.report on a tiny real training run (one epoch on 64 images of the bundled sample)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from fer_keras import report
from fer_keras.errors import ConfigError, DataError, FerError, ModelError

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAINABLE_IMAGENET_1CH = "11,173,831"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
TINY = dict(filter_steps=2, saliency_samples=1, num_filters=2, top_k=2)


def headings(markdown: str) -> list[str]:
    return re.findall(r"^## (.+)$", markdown, flags=re.M)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from fer_keras import train

    model_dir = tmp_path_factory.mktemp("report_run") / "run"
    train.run(train.TrainConfig(
        model_dir=str(model_dir), export=False, stem="imagenet", epochs=1, batch_size=32,
        max_train_examples=64, max_val_examples=32, verbose=0,
    ))
    return model_dir


@pytest.fixture(scope="module")
def full_report(run_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    messages: list[str] = []
    out = tmp_path_factory.mktemp("report_out") / "report"
    path = report.build_report(run_dir, None, out, progress=messages.append, **TINY)
    return path, messages


def test_full_report_has_every_section_and_the_facts(full_report):
    path, messages = full_report
    text = path.read_text()
    assert headings(text) == [report.TITLES[s] for s in report.SECTIONS]
    assert f"**{TRAINABLE_IMAGENET_1CH} trainable**" in text
    assert "**imagenet**" in text
    metrics = json.loads((path.parent / "evaluation" / "val_metrics.json").read_text())
    # The section lines, and the accuracy with its split as the evaluate tool prints it, after its section's line.
    assert messages == [f"[{i}/6] {report.TITLES[s].lower()}" for i, s in enumerate(report.SECTIONS[:3], 1)] + [
        f"val (PublicTest): accuracy {metrics['accuracy']:.2%} ({metrics['num_correct']}/{metrics['num_images']} "
        f"images), macro F1 {metrics['macro_f1']:.3f}, tta none"] + [
        f"[{i}/6] {report.TITLES[s].lower()}" for i, s in enumerate(report.SECTIONS[3:], 4)]
    assert f"val (PublicTest): accuracy {metrics['accuracy']:.2%}" in text
    assert "| 1 | val (PublicTest), stratified subset of at most 32 images |" in text
    assert re.search(r"All \d+ checks pass\.", text)
    assert "python -m fer_keras.train --flagfile=" in text


def test_report_figures_exist_and_html_shows_them(full_report):
    path, _ = full_report
    text = path.read_text()
    links = IMAGE_LINK.findall(text)
    # history, 2 confusion matrices, one saliency figure per class present, 3 per filter layer.
    assert len(links) >= 1 + 2 + 7 + 6
    for link in links:
        figure = path.parent / unquote(link)
        assert figure.is_file(), link
        assert figure.read_bytes()[:8] == PNG_MAGIC, link
    page = (path.parent / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<table>") >= 5
    for link in links:
        assert f'<img src="{link}"' in page, link
    for section in report.SECTIONS:
        assert f'<h2 id="{report.slug(report.TITLES[section])}">' in page
    assert "<pre><code>python -m fer_keras.train" in page


def test_sections_flag_limits_the_report(run_dir, tmp_path):
    path = report.build_report(run_dir, None, tmp_path / "r", sections="gradcheck,architecture")
    text = path.read_text()
    assert headings(text) == ["Architecture", "Gradient checks"]
    assert not (tmp_path / "r" / "evaluation").exists()
    assert "<h2" in (tmp_path / "r" / "report.html").read_text()


def test_history_section_states_the_best_epoch_of_a_tie_and_the_epochs_planned(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_text(
        "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,seconds\n1,2.0,0.3,1.9,0.5,0.1,100\n"
        "2,1.5,0.45,1.25,0.625,0.05,200\n3,1.0,0.6,1.5,0.625,0.01,300\n")
    config = {"epochs": 5, "max_val_examples": 32}  # still training, selecting on part of the sample's PublicTest
    ctx = report._Context(kind="keras", model_path=run / "best.keras", run_dir=run, train_config=config,
                          data_arg=None, split="val", tta="none", crop_size=40, out=tmp_path / "out", seed=0, **TINY)
    text = report.section_history(ctx)
    assert "3 epochs trained of 5 planned. The best epoch" in text
    assert ("| 2 | val (PublicTest), stratified subset of at most 32 images | 1.5000 | 45.00% | 1.2500 | 62.50% | "
            "0.05 | 200.0 |") in text
    assert (tmp_path / "out" / "history" / "history.png").read_bytes()[:8] == PNG_MAGIC
    config["epochs"] = 3
    assert "3 epochs trained. The best epoch" in report.section_history(ctx)


@pytest.mark.parametrize("epochs", [1, 3, 31])
def test_the_history_figure_shows_a_first_epoch_and_whole_epoch_ticks(tmp_path, monkeypatch, epochs):
    """history.png after epoch 1 was empty axes (a line through one point draws nothing) and a short run's axis read
    epoch 1.25: points are marked while few, and ticks are whole epochs."""
    from fer_keras import history as history_lib
    from fer_keras import vis

    drawn = []
    monkeypatch.setattr(vis, "save_figure", lambda fig, path: drawn.append(fig))
    rows = [{"epoch": e, "loss": 2.0 / e, "accuracy": 0.3, "val_loss": 1.9 / e, "val_accuracy": 0.5, "seconds": 1.0}
            for e in range(1, epochs + 1)]
    history_lib.plot_history(rows, tmp_path / "history.png")
    ax_acc, ax_loss = drawn[0].axes
    lines = ax_acc.get_lines() + ax_loss.get_lines()
    assert len(lines) == 4 and {line.get_marker() for line in lines} == ({"o"} if epochs <= 30 else {"None"})
    ticks = [t for t in ax_acc.get_xticks() if ax_acc.get_xlim()[0] <= t <= ax_acc.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_keras_file_outside_a_run_omits_history_with_a_note(run_dir, tmp_path):
    model = tmp_path / "model.keras"
    shutil.copyfile(run_dir / "best.keras", model)
    text = report.build_report(model, None, tmp_path / "r", sections=["architecture", "history"]).read_text()
    assert headings(text) == ["Architecture", "Training history"]
    assert "Omitted:" in text and "keeps no training history" in text
    assert TRAINABLE_IMAGENET_1CH in text
    assert "No training configuration is available" in text


def test_bad_input_is_a_one_line_error(run_dir, tmp_path):
    with pytest.raises(ModelError):
        report.build_report(tmp_path / "missing", None, tmp_path / "r", sections="architecture")
    unlabeled = tmp_path / "test.csv"
    unlabeled.write_text("id,feature\n1," + " ".join(["128"] * 48 * 48) + "\n")
    with pytest.raises(DataError, match="without labels"):
        report.build_report(run_dir, unlabeled, tmp_path / "r", sections="evaluation", split="test")
    with pytest.raises(DataError, match="unknown split"):
        report.build_report(run_dir, None, tmp_path / "r", sections="architecture", split="dev")
    with pytest.raises(ConfigError, match="unknown section 'bogus'"):
        report.parse_sections("architecture,bogus")
    # "all" among other names said "unknown section 'all' ... (or all)"
    assert report.parse_sections("all,history") == report.parse_sections(None) == list(report.SECTIONS)
    assert report.parse_sections(["gradcheck", "architecture", "gradcheck"]) == ["architecture", "gradcheck"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        report.build_report(tmp_path, None, tmp_path / "file", sections="architecture")


def test_files_of_the_users_own_in_the_output_folder_are_not_replaced(tool_inputs, tmp_path):
    _, model, _ = tool_inputs
    out = tmp_path / "notes"
    out.mkdir()
    for name, text in (("report.md", "# my notes\n"), ("report.html", "<p>my page</p>\n")):
        (out / name).write_text(text)
        proc = subprocess.run([sys.executable, "-m", "fer_keras.report", f"--model_dir={model}", f"--output_dir={out}",
                               "--sections=architecture"], cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (f"error: {out / name}: exists and is not a fer_keras report; "
                                                        "choose another --output_dir or remove the file")
        assert (out / name).read_text() == text and sorted(p.name for p in out.iterdir()) == [name]
        (out / name).unlink()
    first = report.build_report(model, None, out, sections="architecture").read_text()
    assert report.build_report(model, None, out, sections="history").read_text() != first  # its own are replaced


@pytest.mark.parametrize("section, name", [("saliency", "saliency.json"), ("saliency", "maps.npz"),
                                           ("gradcheck", "gradcheck.json"), ("gradcheck", "gradcheck.md")])
def test_a_sections_file_of_the_users_own_is_refused_before_any_section_runs(tool_inputs, tmp_path, section, name):
    """The section's tool would refuse the file only when the section runs, after the evaluation and the others
    before it had taken minutes; the report refuses it first, and only when that section is asked for."""
    _, model, _ = tool_inputs
    out = tmp_path / "out"
    (out / section).mkdir(parents=True)
    (out / section / name).write_text("my own notes\n")
    with pytest.raises(ConfigError, match=re.escape(f"{out / section / name}: exists and is not ")):
        report.build_report(model, None, out, sections=f"architecture,evaluation,{section}")
    assert sorted(p.name for p in out.iterdir()) == [section]
    assert (out / section / name).read_text() == "my own notes\n"
    report.build_report(model, None, out, sections="architecture")
    assert (out / "report.md").is_file() and (out / section / name).read_text() == "my own notes\n"


def test_cli_refuses_a_crop_size_outside_the_image(tmp_path):
    """evaluate, predict and export refused it; report took --crop_size=-5 when its TTA was not ten-crop."""
    proc = subprocess.run([sys.executable, "-m", "fer_keras.report", "--crop_size=-5", f"--output_dir={tmp_path}"],
                          cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--crop_size must be in 1-48" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_evaluates_ten_crop_with_the_crop_size_asked_for(tool_inputs, tmp_path):
    """--crop_size reaches the evaluation section's views (no test passed one: 40 passed either way)."""
    _, model, data = tool_inputs
    proc = subprocess.run([sys.executable, "-m", "fer_keras.report", f"--model_dir={model}", f"--data={data}",
                           "--sections=evaluation", "--tta=tencrop", "--crop_size=44", f"--output_dir={tmp_path}"],
                          cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "evaluation" / "val_tta-tencrop_metrics.json").read_text())
    assert (metrics["tta"], metrics["crop_size"]) == ("tencrop", 44)


def test_cli_missing_model_dir_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "fer_keras.report", f"--model_dir={tmp_path / 'nope'}",
         f"--output_dir={tmp_path / 'out'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_markdown_converter_subset():
    markdown = "\n".join([
        "# Title", "", "Some **bold** and `a<b>` text,", "continued.", "",
        "| a | b \\| c |", "|---|---:|", "| 1 | 2 |", "",
        "![A <figure>](dir/x.png)", "", "- one", "- two [link](y.md)", "", "```", "x < 1", "```",
    ])
    page = report.markdown_to_html(markdown, "t")
    assert '<h1 id="title">Title</h1>' in page
    assert "<p>Some <strong>bold</strong> and <code>a&lt;b&gt;</code> text, continued.</p>" in page
    assert '<th style="text-align:right">b | c</th>' in page and '<td style="text-align:right">2</td>' in page
    assert '<img src="dir/x.png" alt="A &lt;figure&gt;">' in page
    assert '<li>two <a href="y.md">link</a></li>' in page
    assert "<pre><code>x &lt; 1</code></pre>" in page


@pytest.mark.parametrize("value, shown", [
    ("a|b", "a|b"),
    ("a\nb", "a b"),
    ("a\r\nb", "a b"),
    ("a\rb", "a b"),  # a line break in CommonMark and to str.splitlines, which markdown_to_html splits on
    ("a\x0cb\u2028c", "a b c"),
    ("p|q\n|r", "p|q |r"),
    (3, "3"),
    (None, "None"),
    ("<b>&", "&lt;b&gt;&amp;"),
    ("**total**", "<strong>total</strong>"),  # bold on purpose: the layer table's total row
])
def test_md_escape_keeps_any_value_in_its_own_cell(value, shown):
    """A value with a pipe or a line break of any kind stays one cell of one row, in report.md (three lines) and in
    report.html (two cells in the row)."""
    markdown = report.md_table(("value", "next"), [(value, "after")])
    assert len(markdown.splitlines()) == 3, repr(markdown)
    rows = re.findall(r"<tr>(.*?)</tr>", report.markdown_to_html(markdown))
    assert rows == ["<th>value</th><th>next</th>", f"<td>{shown}</td><td>after</td>"]


def test_a_link_to_a_file_whose_path_has_spaces_parentheses_hashes_or_percents_opens_it(tmp_path, monkeypatch):
    """Links are percent-quoted: a space or ')' left as is would end the Markdown link, a '#' start the URL's
    fragment, a '%' read as an escape. Relative to the report (whose own folder may have any name), so that
    report.md and report.html, side by side, both lead to the file, and the folder can be moved."""
    import html
    from urllib.parse import urljoin, urlsplit
    from urllib.request import url2pathname

    out = tmp_path / "report (v2) #1"
    figure = out / "my figs (a)#1" / "x y) 100%.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(PNG_MAGIC)
    ctx = report._Context(kind="keras", model_path=tmp_path / "m.keras", run_dir=None, train_config=None,
                          data_arg=None, split="val", tta="none", crop_size=40, out=out, seed=0, **TINY)
    link = ctx.link(figure)
    assert link == "my%20figs%20%28a%29%231/x%20y%29%20100%25.png"
    markdown = "\n".join([report.md_image("A figure", link), "", f"Its data: [x.png]({link})."])
    assert IMAGE_LINK.findall(markdown) == [link] and (out / unquote(link)).is_file()
    urls = re.findall(r'(?:src|href)="([^"]*)"', report.markdown_to_html(markdown))
    assert urls == [link, link]
    for url in urls:  # as a browser resolves it against report.html
        target = urlsplit(urljoin((out / "report.html").as_uri(), html.unescape(url)))
        assert not target.fragment and Path(url2pathname(target.path)) == figure
    monkeypatch.chdir(tmp_path)
    assert ctx.link(figure.relative_to(tmp_path)) == link  # a path relative to the working directory
    assert ctx.link(str(tmp_path / "other.png")) == "../other.png"


def test_a_run_on_the_course_layout_with_a_bad_row_is_reported_on_its_own_hold_out(tmp_path):
    """train.csv of the course (no PublicTest) with one malformed row, trained with --skip_bad_rows: the report
    reads the data as the run did and evaluates the hold-out that chose the epoch, named as such."""
    import numpy as np

    from fer_keras import train

    rng = np.random.default_rng(0)
    rows = [f"{i % 7}," + " ".join(map(str, rng.integers(0, 256, 48 * 48))) for i in range(77)]
    rows.insert(40, "3,1 2 3")  # three pixels
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "train.csv").write_text("label,feature\n" + "\n".join(rows) + "\n")
    data = str(tmp_path / "faces" / "train.csv")
    result = train.run(train.TrainConfig(model_dir=str(tmp_path / "run"), data=data, skip_bad_rows=True,
                                         export_dir=str(tmp_path / "exports"), export_tta="none", stem="imagenet",
                                         epochs=1, batch_size=32, verbose=0))
    shutil.copyfile(result.model_dir / "best.keras", tmp_path / "alone.keras")
    with pytest.raises(DataError, match=r"train.csv: line 42: expected 2304 pixels"):  # no run to say otherwise
        report.build_report(tmp_path / "alone.keras", data, tmp_path / "r", sections="evaluation")
    text = report.build_report(result.model_dir / "best.keras", data, tmp_path / "r",
                               sections="evaluation,history").read_text()
    assert "val (10% stratified hold-out of train): accuracy" in text
    assert f"({round(result.best_val_accuracy * 7)} of 7 images" in text  # the accuracy that chose the epoch
    # The model card names that hold-out in every figure too, not PublicTest.
    from fer_keras import model_card

    card, _ = model_card.build_card(result.model_dir, result.export_path.parent, None, None, ("none", "flip"))
    for entry in (card["served"], card["best_keras"]["none"], card["best_keras"]["flip"]):
        assert entry["split_label"] == "val (10% stratified hold-out of train)", entry
    assert card["served"]["num_correct"] == round(result.best_val_accuracy * 7)


def test_saliency_of_an_export_reports_its_served_predictions(run_dir, tmp_path):
    """An export's report shows what it serves: ten-crop with the export's own crop size (44 here, not the
    default 40), averaged as the export averages it."""
    import numpy as np

    from fer_keras import data as fer_data
    from fer_keras.export import export_model
    from fer_keras.inference import load_keras, load_predictor

    path = export_model(load_keras(run_dir / "best.keras"), tmp_path / "exports", "m", tta="tencrop", crop_size=44)
    text = report.build_report(path, None, tmp_path / "r", sections="saliency", **TINY).read_text()
    assert "averaged over its built-in tencrop views" in text
    saved = json.loads((tmp_path / "r" / "saliency" / "saliency.json").read_text())
    assert saved["prediction_tta"] == "tencrop"
    split = fer_data.load(None).split("val")
    images = split.images[[r["index"] for r in saved["images"]]]
    names = list(saved["images"][0]["probabilities"])
    got = np.array([[r["probabilities"][n] for n in names] for r in saved["images"]])
    np.testing.assert_allclose(got, load_predictor(path).probabilities(images), atol=2e-5)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", [FerError("the section failed"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_run_leaves_the_earlier_report_and_its_figures_as_they_were(tool_inputs, tmp_path, monkeypatch,
                                                                          failure):
    """A section failing after the ones before it (and its own tool) had written left the old report.md beside new
    figures, which it silently misdescribed. While the sections run there is no report.md, so a kill leaves none
    rather than such a one, and the next run puts the killed run's earlier report back first."""
    import socket

    _, model, data = tool_inputs
    out = tmp_path / "out"
    report.build_report(model, data, out, sections="architecture,gradcheck", seed=0)
    before = _tree(out)
    gradcheck = report.section_gradcheck
    seen = []

    def failing(ctx):
        gradcheck(ctx)  # gradcheck.json of seed 1 written
        seen.extend(p.name for p in out.iterdir() if not p.name.startswith("."))
        raise failure

    monkeypatch.setitem(report.SECTION_BUILDERS, "gradcheck", failing)
    with pytest.raises(type(failure)):
        report.build_report(model, data, out, sections="saliency,gradcheck", seed=1, **TINY)
    assert sorted(seen) == ["gradcheck", "saliency"]
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["gradcheck", "report.html", "report.md"]

    def killed_run(tag: str = "report") -> Path:
        dead = subprocess.Popen([sys.executable, "-c", ""])
        dead.wait()
        return out / f".tmp-{tag}-{socket.gethostname()}-{dead.pid}"

    # Killed in its sections: the earlier pages set aside, gradcheck copied, saliency added, gradcheck rewritten.
    killed = killed_run()
    shutil.copytree(out / "gradcheck", killed / "gradcheck")
    (killed / report.ADDED_RECORD).write_text('["saliency"]')
    for page in report.REPORT_PAGES:
        os.replace(out / page, killed / page)
    (out / "gradcheck" / "gradcheck.json").write_text("{}")
    (out / "saliency").mkdir()
    with pytest.raises(type(failure)):
        report.build_report(model, data, out, sections="gradcheck", seed=1)
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["gradcheck", "report.html", "report.md"]
    # Killed after writing its report (here the earlier one): what it set aside is older and stays aside.
    finished = killed_run()
    finished.mkdir()
    (finished / report.ADDED_RECORD).write_text("[]")
    (finished / "report.md").write_text("# an older report")
    with pytest.raises(type(failure)):
        report.build_report(model, data, out, sections="gradcheck", seed=1)
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["gradcheck", "report.html", "report.md"]
    monkeypatch.undo()
    (killed_run() / "gradcheck").mkdir(parents=True)  # killed while copying: no record, nothing changed yet
    killed_run("history").write_text("half a file")  # a killed writer's temporary, removed as well
    text = report.build_report(model, data, out, sections="saliency,gradcheck", seed=1, **TINY).read_text()
    assert headings(text) == ["Saliency maps", "Gradient checks"]
    assert json.loads((out / "gradcheck" / "gradcheck.json").read_text())["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["gradcheck", "report.html", "report.md", "saliency"]


def test_the_sections_run_with_the_reports_settings(tool_inputs, tmp_path):
    """The report's own flags reach each section's tool: ten-crop's crop size, SmoothGrad's samples and seed, the
    number of filters; and the validation caveat is stated for the split epochs were chosen on, not for others."""
    _, model, data = tool_inputs
    out = tmp_path / "r"
    text = report.build_report(model, data, out, sections="evaluation,saliency,filters", tta="tencrop", crop_size=44,
                               seed=3, **TINY).read_text()
    metrics = json.loads((out / "evaluation" / "val_tta-tencrop_metrics.json").read_text())
    assert (metrics["tta"], metrics["crop_size"]) == ("tencrop", 44)
    assert "slightly optimistic" in text
    saved = json.loads((out / "saliency" / "saliency.json").read_text())
    assert (saved["smooth_samples"], saved["smooth_seed"]) == (1, 3)
    for layer in ("stem_relu", "stage4_block2"):
        table = text.split(f"### `{layer}`")[1].split("###")[0]
        assert re.findall(r"^\| (\d+) \|", table, flags=re.M) == ["0", "1"], layer
    text = report.build_report(model, data, tmp_path / "t", sections="evaluation", split="train").read_text()
    assert "accuracy" in text and "slightly optimistic" not in text


def test_the_filters_section_states_the_filters_and_images_it_shows(tool_inputs, tmp_path):
    """More filters asked for than a layer has, and a larger top-k than the split holds: the text claimed the
    numbers asked for (100 filters of a 64-channel stem), the figures showed the capped ones."""
    import keras

    _, _, data = tool_inputs
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Conv2D(2, 3, name="first")(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Conv2D(3, 3, name="last")(x)
    model = keras.Model(inputs, keras.layers.Dense(7)(keras.layers.GlobalAveragePooling2D()(x)))
    kernel, bias = model.get_layer("first").get_weights()
    kernel[..., 1] = 0.0
    model.get_layer("first").set_weights([kernel, bias * 0.0])
    ctx = report._Context(kind="keras", model_path=tmp_path / "m.keras", run_dir=None, train_config=None,
                          data_arg=str(data), split="val", tta="none", crop_size=40, out=tmp_path, seed=0,
                          _model=model, **{**TINY, "num_filters": 3, "top_k": 50})
    ctx.load_data()
    text = report.section_filters(ctx)
    images = len(ctx.split_data())
    assert text.startswith("The first 3 filters (channels; all of a layer that has fewer) of `first` and `last`")
    assert f"the top-{images} images are the val (PublicTest) images" in text and "top-50" not in text
    assert [len(re.findall(r"^\| (\d+) \|", text.split(f"### `{layer}`")[1].split("###")[0], flags=re.M))
            for layer in ("first", "last")] == [2, 3]
    first = text.split("### `first`")[1].split("###")[0]
    assert "; 1 dead (constant on noise and on the top image)." in first  # filter 1's weights are all zero
    assert re.search(r"^\| 1 \| 0 \(dead\) \| 0 \| none above 0 \|$", first, flags=re.M)


@pytest.mark.parametrize("stem, channels", [("imagenet", 3), ("cifar_pool", 1), ("cifar", 1)])
def test_the_stem_of_a_model_without_its_training_config_is_read_from_its_layers(tmp_path, stem, channels):
    from fer_keras.model import resnet18

    ctx = report._Context(kind="keras", model_path=tmp_path / "m.keras", run_dir=None, train_config=None,
                          data_arg=None, split="val", tta="none", crop_size=40, out=tmp_path, seed=0,
                          _model=resnet18(stem, input_channels=channels), **TINY)
    text = report.section_architecture(ctx)
    assert f"Stem: **{stem}** ({report.STEM_DESCRIPTIONS[stem]}); {channels} input channel" in text


@pytest.mark.parametrize("setting", ["filter_steps", "saliency_samples", "num_filters", "top_k"])
def test_settings_below_one_are_refused_before_anything_runs(tmp_path, setting):
    """The flags' validators guard the command, the library checks them itself: num_filters=0 would draw the
    default 16 filters under a text saying 0."""
    with pytest.raises(ConfigError, match=f"^{setting} must be >= 1, got 0$"):
        report.build_report(None, None, tmp_path / "r", **{setting: 0})
    assert not (tmp_path / "r").exists()
