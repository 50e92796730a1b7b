"""The model card is measured, not typed: its figures equal a fresh evaluation, its recipe the run's flags."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_RUN, run_tool

from fer_keras import data as fer_data
from fer_keras import history, inference, model_card, train
from fer_keras.errors import ConfigError
from fer_keras.evaluate import evaluate
from fer_keras.history import read_history_csv
from fer_keras.predict import PROBABILITY_COLUMNS
from fer_keras.tta import TTA_MODES

SHIPPED = Path(__file__).resolve().parents[1] / "saved_models" / "fer_resnet18"


def served_record(base: Path, card: dict) -> list[dict]:
    """The rows of the per-image record a card names (the evaluate tool's predictions CSV)."""
    with open(base / card["served_predictions"], newline="") as f:
        return list(csv.DictReader(f))


def test_card_figures_equal_a_fresh_evaluation(trained_run, tmp_path):
    config, result = trained_run
    export_base = tmp_path / result.export_path.parent.name  # a copy: the run's fixture is shared
    shutil.copytree(result.export_path.parent, export_base)
    readme = model_card.write_card(result.model_dir, export_base, None, None)
    card = json.loads((export_base / model_card.CARD_JSON).read_text())
    # Measured on the split that chose the run's epoch: the sample's PublicTest cut to max_val_examples.
    _, val, _ = train.run_splits(fer_data.load(None), config)
    fresh = evaluate(inference.load_predictor(export_base / "1"), val, "none", split_name="val")
    assert card["served"]["num_correct"] == fresh.num_correct
    assert card["served"]["num_images"] == len(val) and 0 < len(val) <= config.max_val_examples
    # The run exported with --export_tta=auto: serving equals best.keras with the TTA it chose.
    served_tta = inference.export_metadata(export_base / "1")["tta_selection"]["chosen"]
    assert card["served_tta"] == served_tta
    assert card["best_keras"][served_tta]["num_correct"] == fresh.num_correct
    assert set(card["best_keras"]) == set(TTA_MODES)
    assert card["training"]["epochs"] == config.epochs
    seconds = [row["seconds"] for row in read_history_csv(result.model_dir / "history.csv")]
    assert card["training"]["wall_seconds"] == pytest.approx(sum(seconds)) and sum(seconds) > 0
    assert card["training"]["epoch_seconds"] == [min(seconds), max(seconds)]
    assert card["selection_split"] == "val (PublicTest)"
    text = readme.read_text()
    assert f"{100 * fresh.accuracy:.1f} % ({fresh.num_correct:,} / {len(val)})" in text
    low, high = f"{min(seconds):,.0f}", f"{max(seconds):,.0f}"
    assert f"the sum of its epochs' times ({low if low == high else f'{low}–{high}'} s each;" in text
    facts = model_card.history_facts(read_history_csv(result.model_dir / "history.csv"))
    assert {key: card["training"][key] for key in facts} == facts
    assert (f"- best epoch {facts['best_epoch']} (val (PublicTest) {100 * facts['best_epoch_val_accuracy']:.1f} % "
            f"during training; final train accuracy {100 * facts['final_train_accuracy']:.1f} % on augmented "
            f"batches).\n- wall time {sum(seconds) / 3600:.2f} h, the sum of its epochs' times") in text
    assert "was chosen by `--export_tta=auto` on PublicTest" in text
    compared = inference.export_metadata(export_base / "1")["tta_selection"]["accuracy"]
    assert f"points of the best (none {100 * compared['none']:.2f} %, flip {100 * compared['flip']:.2f} %" in text
    for name in ("history.png", "confusion_matrix.png"):
        assert (export_base / name).read_bytes().startswith(b"\x89PNG")
    rows = served_record(export_base, card)
    assert [r["id"] for r in rows] == val.ids.tolist()
    assert [int(r["predicted"]) for r in rows] == fresh.predictions.tolist()
    assert f"`{model_card.SERVED_PREDICTIONS}` holds the served export's prediction for each of the {len(val)}" in text
    assert (export_base / model_card.TRAIN_FLAGS).read_text() == (result.model_dir / "flags.txt").read_text()
    assert f"--flagfile={model_card.TRAIN_FLAGS}" in text
    assert inference.resolve(export_base) == ("saved_model", export_base / "1")  # still serves the version
    assert card["serving_checks"]  # the export checks its input, and the card says so; an older export's does not
    checks = "NaN, infinite or out-of-range pixels (a scaled or normalised image) are refused with `INVALID_ARGUMENT`"
    assert checks in text and checks not in model_card.render_markdown({**card, "serving_checks": False})
    no_tta = "`serving_no_tta` takes the same float32 pixels and answers from the image alone, without the built-in"
    assert card["signatures"] == inference.export_metadata(export_base / "1")["signatures"]
    assert (no_tta in text) == (served_tta != "none") == ("serving_no_tta" in card["signatures"])
    with_tencrop = model_card.render_markdown({**card, "served_tta": "tencrop",
                                            "signatures": ["serving_default", "serving_uint8", "serving_no_tta"]})
    assert f"{no_tta} tencrop TTA (one forward pass per image instead of 10)." in with_tencrop
    assert "sgd lr 0.01 cosine (warm-up 0), decoupled" in text  # constant momentum: nothing said of it
    card["training"]["config"].update(schedule="onecycle", cycle_momentum=True, momentum=0.95, base_momentum=0.85)
    assert ("sgd lr 0.01 onecycle (warm-up 0; momentum 0.95 cycling down to 0.85 at the peak), decoupled"
            in model_card.render_markdown(card))
    assert "mixup=0.0 fill_mode=reflect, precision" in text
    assert "decoupled weight decay 0.0005 on kernels only, label" in text
    assert "(fill noise, up to 0.25 of the image) mixup" in text
    card["training"]["config"].update(decay_norm_and_bias=True, erasing_fill="mean", erasing_max_area=0.33)
    rendered = model_card.render_markdown(card)
    assert "weight decay 0.0005 on all parameters, label" in rendered
    assert "(fill mean, up to 0.33 of the image) mixup" in rendered
    for key in ("fill_mode", "decay_norm_and_bias", "erasing_fill", "erasing_max_area"):
        del card["training"]["config"][key]  # a run from before the flags: what it did is their default
    rendered = model_card.render_markdown(card)
    assert "mixup=0.0 fill_mode=reflect, precision" in rendered
    assert "on kernels only" in rendered and "(fill noise, up to 0.25 of the image)" in rendered


def test_the_card_states_the_best_epoch_of_a_tie_the_last_epochs_training_accuracy_and_every_epochs_time():
    rows = [{"epoch": 1, "accuracy": 0.3, "val_accuracy": 0.5, "seconds": 100.0},
            {"epoch": 2, "accuracy": 0.5, "val_accuracy": 0.6, "seconds": 250.0},
            {"epoch": 3, "accuracy": 0.7, "val_accuracy": 0.6, "seconds": 120.5}]
    assert model_card.history_facts(rows) == {
        "epochs": 3, "best_epoch": 2, "best_epoch_val_accuracy": 0.6, "final_train_accuracy": 0.7,
        "wall_seconds": 470.5, "epoch_seconds": [100.0, 250.0]}


def test_recipe_must_match_the_run(trained_run, tmp_path):
    config, result = trained_run
    base = tmp_path / "base.cfg"
    base.write_text("# the run's own settings\n--stem=imagenet\n--epochs=2\n--batch_size=32\n--nodeterministic\n")
    good = tmp_path / "good.cfg"
    good.write_text(f"--flagfile={base}\n--flip\n--learning_rate=0.01\n")
    assert model_card.check_recipe(good, result.model_dir / "flags.txt")["epochs"] == "2"
    bad = tmp_path / "bad.cfg"
    bad.write_text(f"--flagfile={good}\n--epochs=60\n--noflip\n--warp_speed=9\n")
    with pytest.raises(ConfigError, match=r"--epochs: recipe 60, run 2; --flip: recipe False, run True; "
                                          r"--warp_speed: recipe 9, run \(unset\)"):
        model_card.check_recipe(bad, result.model_dir / "flags.txt")
    diamond = tmp_path / "diamond.cfg"
    diamond.write_text(f"--flagfile={base}\n--flagfile={good}\n")  # base.cfg read twice, as absl allows
    assert model_card.check_recipe(diamond, result.model_dir / "flags.txt")["epochs"] == "2"
    loop = tmp_path / "loop.cfg"
    loop.write_text(f"--flagfile={good}\n--flagfile={loop}\n")
    with pytest.raises(ConfigError, match="loop.cfg: flagfile includes itself"):
        model_card.check_recipe(loop, result.model_dir / "flags.txt")


def test_flagfiles_that_are_not_text_are_named_in_one_line(trained_run, tmp_path):
    """A recipe or a run's flags.txt saved in another encoding (or a binary file given by mistake) was a
    UnicodeDecodeError traceback from model_card and from --init_from's record of the run."""
    _, result = trained_run
    recipe = tmp_path / "recipe.cfg"
    recipe.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ConfigError, match=r"recipe.cfg: not a recipe flagfile \(not UTF-8 text: invalid start byte "
                                          r"at byte 0\)"):
        model_card.check_recipe(recipe, result.model_dir / "flags.txt")
    run = tmp_path / "run"
    shutil.copytree(result.model_dir, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    (run / "flags.txt").write_bytes("# \u00e9t\u00e9\n--epochs=2\n".encode("latin-1"))
    recipe.write_text("--epochs=2\n")
    message = rf"{run / 'flags.txt'}: not UTF-8 text \(invalid continuation byte at byte 2\)"
    with pytest.raises(ConfigError, match=message):
        model_card.check_recipe(recipe, run / "flags.txt")
    with pytest.raises(ConfigError, match=message):
        history.run_record(run)


def test_card_refuses_other_data_and_draws_a_missing_history_plot(trained_run, tmp_path):
    from conftest import write_challenge_csv

    _, result = trained_run
    run, export_base = tmp_path / "run", tmp_path / "exports"
    shutil.copytree(result.model_dir, run)
    shutil.copytree(result.export_path.parent, export_base)
    write_challenge_csv(tmp_path / "other.csv", n_val_per_class=10)
    with pytest.raises(ConfigError, match=r"other.csv: its PublicTest images differ from those .*/run chose its "
                                          r"epoch on \(data.json\); pass the data the run was trained on"):
        model_card.build_card(run, export_base, str(tmp_path / "other.csv"), None)
    (run / "history.png").unlink()
    model_card.write_card(run, export_base, None, None)
    assert (export_base / "history.png").read_bytes().startswith(b"\x89PNG")


def test_card_refuses_an_export_of_another_run(trained_run, tmp_path):
    """The card would state this run's recipe and history beside another model's accuracy."""
    _, result = trained_run
    run, export_base = tmp_path / "run", tmp_path / "exports"
    shutil.copytree(result.model_dir, run)  # a moved run folder is still the export's run
    shutil.copytree(result.export_path.parent, export_base)
    metadata_file = export_base / "1" / "assets.extra" / "fer_keras.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "best_epoch": metadata["best_epoch"] + 5}))
    with pytest.raises(ConfigError, match=rf"exports/1 holds another model than .*/run's best epoch: best_epoch "
                                          rf"{metadata['best_epoch'] + 5} \(run: {metadata['best_epoch']}\); pass"):
        model_card.build_card(run, export_base, None, None)
    metadata_file.write_text(json.dumps({k: v for k, v in metadata.items() if k != "best_epoch"}))
    with pytest.raises(ConfigError, match="its metadata does not say which run's epoch it holds"):
        model_card.build_card(run, export_base, None, None)
    candidate = tmp_path / "candidate"  # a version folder copied out of NAME/: the card would land in tmp_path
    shutil.copytree(result.export_path, candidate)
    with pytest.raises(ConfigError, match="candidate: not a version folder of TF Serving's NAME/VERSION layout"):
        model_card.build_card(run, candidate, None, None)


def test_an_export_is_the_runs_by_its_epoch_accuracy_and_selection_split():
    best = {"epoch": 7, "val_accuracy": 0.6942}
    ours = {"best_epoch": 7, "val_accuracy": 0.694204, "val_split": "PublicTest"}  # history.csv keeps 6 digits

    def check(**changes):
        model_card._check_export_of_run({**ours, **changes}, Path("e/1"), Path("run"), best, "PublicTest")

    check()
    check(val_split=None)  # an export made before it recorded the split
    for changes, differ in [({"best_epoch": 8}, "best_epoch 8 (run: 7)"),
                            ({"val_accuracy": 0.6945}, "val_accuracy 0.6945 (run: 0.6942)"),
                            ({"val_split": "10% stratified hold-out"},
                             "val_split '10% stratified hold-out' (run: 'PublicTest')")]:
        with pytest.raises(ConfigError, match=rf"^e/1 holds another model than run's best epoch: {re.escape(differ)};"):
            check(**changes)


def test_card_of_a_run_started_from_another_states_both_runs(trained_run, tmp_path):
    config, first = trained_run
    first_dir = tmp_path / "first" / "run"  # a copy: this test removes it at the end
    shutil.copytree(first.model_dir, first_dir)
    second = train.run(train.TrainConfig(
        model_dir=str(tmp_path / "cont"), export_dir=str(tmp_path / "exports"), init_from=str(first_dir),
        **{**SMALL_RUN, "epochs": 1, "export_tta": "none"}))
    base = second.export_path.parent
    first_recipe = tmp_path / "first.cfg"
    first_recipe.write_text("--stem=imagenet\n--epochs=2\n")
    recipe = tmp_path / "second.cfg"
    recipe.write_text("--epochs=1\n--init_from=runs/somewhere_else\n")  # a path: not part of the recipe
    readme = model_card.write_card(second.model_dir, base, None, recipe, ("none",), init_recipe=first_recipe)
    card = json.loads((base / model_card.CARD_JSON).read_text())
    start = card["training"]["init"]["run"]
    assert (start["epochs"], start["best_epoch"], start["recipe"]) == (config.epochs, first.best_epoch,
                                                                       str(first_recipe))
    seconds = [r["seconds"] for r in read_history_csv(first.model_dir / "history.csv")]
    seconds += [r["seconds"] for r in read_history_csv(second.model_dir / "history.csv")]
    assert card["training"]["total_wall_seconds"] == pytest.approx(sum(seconds))
    text = readme.read_text()
    assert f"--flagfile={first_recipe} --model_dir=runs/run\n" in text
    assert f"--flagfile={recipe} --init_from=runs/run --model_dir=runs/cont\n" in text
    assert f"started from the weights of epoch {first.best_epoch} of a 2-epoch run" in text
    assert (base / model_card.INIT_FLAGS).read_text() == (first_dir / "flags.txt").read_text()
    # The start run's path is not the recipe, but whether there is one is.
    with pytest.raises(ConfigError, match=r"--init_from: recipe runs/somewhere_else, run \(unset\)"):
        model_card.check_recipe(recipe, first_dir / "flags.txt")
    first_recipe.write_text("--stem=imagenet\n--epochs=60\n")
    with pytest.raises(ConfigError, match=r"first.cfg: the run in .*/run was not trained with this recipe "
                                          r"\(--epochs: recipe 60, run 2\)"):
        model_card.build_card(second.model_dir, base, None, recipe, ("none",), init_recipe=first_recipe)
    with pytest.raises(ConfigError, match="did not start from another run's weights"):
        model_card.build_card(first.model_dir, first.export_path.parent, None, None, ("none",),
                              init_recipe=first_recipe)
    # A card without a start run, in the same folder (the first run's export as its newest version), drops the
    # start run's flags.
    shutil.copytree(first.export_path, base / "2")
    model_card.write_card(first.model_dir, base, None, None, ("none",))
    assert not (base / model_card.INIT_FLAGS).exists()
    shutil.rmtree(base / "2")
    # init.json keeps the start run's flags, so the card outlives that run's directory.
    shutil.rmtree(first_dir)
    first_recipe.write_text("--stem=imagenet\n--epochs=2\n")
    model_card.write_card(second.model_dir, base, None, recipe, ("none",), init_recipe=first_recipe)
    assert (base / model_card.INIT_FLAGS).read_text() == (first.model_dir / "flags.txt").read_text()
    init_json = second.model_dir / "init.json"  # as written before init.json kept them
    record = json.loads(init_json.read_text())
    del record["run"]["flags"]
    init_json.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"cont started from the run in .*first/run, which is gone \(no flags.txt\)"):
        model_card.build_card(second.model_dir, base, None, None, ("none",))


@pytest.mark.slow
def test_card_of_a_chain_of_restarts_states_every_run(trained_run, tmp_path):
    """first -> second -> third: the card gives three commands, every run's flags and the wall time of all three,
    also from an init.json written before runs kept their own start (then read from the second run's folder)."""
    config, first = trained_run
    small = {**SMALL_RUN, "epochs": 1, "export_tta": "none"}
    second = train.run(train.TrainConfig(model_dir=str(tmp_path / "second"), export=False,
                                         init_from=str(first.model_dir), **small))
    third = train.run(train.TrainConfig(model_dir=str(tmp_path / "third"), export_dir=str(tmp_path / "ex3"),
                                        init_from=str(second.model_dir), **small))
    recipes = [tmp_path / "first.cfg", tmp_path / "second.cfg", tmp_path / "third.cfg"]
    recipes[0].write_text("--stem=imagenet\n--epochs=2\n")
    recipes[1].write_text("--epochs=1\n--init_from=runs/first\n")
    recipes[2].write_text("--epochs=1\n--init_from=runs/second\n")
    base = third.export_path.parent
    seconds = [r["seconds"] for run in (first, second, third) for r in read_history_csv(run.model_dir / "history.csv")]
    init_json = third.model_dir / "init.json"
    for legacy in (False, True):
        if legacy:  # as written before run_record kept the start run's own init.json
            record = json.loads(init_json.read_text())
            assert record["run"]["init"]["run"]["model_dir"] == str(first.model_dir.resolve())
            del record["run"]["init"]
            init_json.write_text(json.dumps(record))
        readme = model_card.write_card(third.model_dir, base, None, recipes[2], ("none",),
                                       init_recipe=[recipes[1], recipes[0]])
        text = readme.read_text()
        assert (f"--flagfile={recipes[0]} --model_dir=runs/{first.model_dir.name}\n"
                f"python -m fer_keras.train --data=fer2013.csv.gz --flagfile={recipes[1]} "
                f"--init_from=runs/{first.model_dir.name} --model_dir=runs/second\n"
                f"python -m fer_keras.train --data=fer2013.csv.gz --flagfile={recipes[2]} "
                f"--init_from=runs/second --model_dir=runs/third\n") in text
        assert (f"started from the weights of epoch {second.best_epoch} of a 1-epoch run (") in text
        assert (f"which started from the weights of epoch {first.best_epoch} of a 2-epoch run (") in text
        assert f"`{model_card.init_flags_name(2)}`), not from random weights; all 3 runs together took" in text
        assert (base / model_card.INIT_FLAGS).read_text() == (second.model_dir / "flags.txt").read_text()
        assert (base / "init2_train_flags.txt").read_text() == (first.model_dir / "flags.txt").read_text()
        card = json.loads((base / model_card.CARD_JSON).read_text())
        assert card["training"]["total_wall_seconds"] == pytest.approx(sum(seconds))
        assert card["training"]["init"]["run"]["init"]["run"]["recipe"] == str(recipes[0])
    with pytest.raises(ConfigError, match=r"first.cfg: the run in .* was not trained with this recipe"):
        model_card.build_card(third.model_dir, base, None, None, ("none",), init_recipe=[recipes[0]])
    with pytest.raises(ConfigError, match=r"--init_recipe names 3 flagfile\(s\), but .*third descends from 2"):
        model_card.build_card(third.model_dir, base, None, None, ("none",), init_recipe=recipes)
    # A run started from the third run's export after that run's folder is gone reads the chain from the card.
    away = tmp_path / "third_away"
    third.model_dir.rename(away)
    try:
        train.run(train.TrainConfig(model_dir=str(tmp_path / "fourth"), export=False,
                                    init_from=str(base / "1"), **small))
    finally:
        away.rename(third.model_dir)
    start = json.loads((tmp_path / "fourth" / "init.json").read_text())["run"]
    assert start["flags"] == (third.model_dir / "flags.txt").read_text()  # from the card's train_flags.txt
    assert start["init"]["run"]["flags"] == (second.model_dir / "flags.txt").read_text()
    assert start["init"]["run"]["init"]["run"]["flags"] == (first.model_dir / "flags.txt").read_text()
    # Without the second run's folder the legacy record knows only that the second run started from the first's
    # folder (its recorded configuration), not how those weights were trained.
    shutil.rmtree(second.model_dir)
    text = model_card.write_card(third.model_dir, base, None, None, ("none",)).read_text()
    assert (f"which started from the weights of `{first.model_dir.name}` (how those weights were trained is not "
            "recorded), not from random weights; the total wall time is unknown.") in text
    assert f"--flagfile={model_card.INIT_FLAGS} --init_from={first.model_dir.name} --model_dir=runs/second" in text
    assert not (base / "init2_train_flags.txt").exists()
    assert json.loads((base / model_card.CARD_JSON).read_text())["training"]["total_wall_seconds"] is None


@pytest.mark.slow
def test_card_of_a_chain_that_began_from_a_bare_keras_file_says_its_origin_is_unrecorded(trained_run, tmp_path):
    _, first = trained_run
    shutil.copy(first.model_dir / "best.keras", tmp_path / "pretrained.keras")
    small = {**SMALL_RUN, "epochs": 1, "export_tta": "none"}
    middle = train.run(train.TrainConfig(model_dir=str(tmp_path / "middle"), export=False,
                                         init_from=str(tmp_path / "pretrained.keras"), **small))
    last = train.run(train.TrainConfig(model_dir=str(tmp_path / "last"), export_dir=str(tmp_path / "ex"),
                                       init_from=str(middle.model_dir), **small))
    text = model_card.write_card(last.model_dir, last.export_path.parent, None, None, ("none",)).read_text()
    assert ("which started from the weights of `pretrained.keras` (how those weights were trained is not "
            "recorded), not from random weights; the total wall time is unknown.") in text
    assert f"--init_from=pretrained.keras --model_dir=runs/{middle.model_dir.name}\n" in text
    card = json.loads((last.export_path.parent / model_card.CARD_JSON).read_text())
    assert card["training"]["total_wall_seconds"] is None
    # A start run whose init.json is lost or damaged still records that it did not start from random weights.
    for damage in ("lost", "damaged"):
        if damage == "lost":
            (middle.model_dir / "init.json").unlink()
        else:
            (middle.model_dir / "init.json").write_text("{")
        assert history.run_record(middle.model_dir)["init"] == {"path": str(tmp_path / "pretrained.keras")}
    # The card's own run without its init.json: still not from random weights.
    (last.model_dir / "init.json").unlink()
    text = model_card.write_card(last.model_dir, last.export_path.parent, None, None, ("none",)).read_text()
    assert (f"- started from the weights of `{middle.model_dir.name}` (how those weights were trained is not "
            "recorded), not from random weights.") in text


def test_card_of_a_run_started_from_an_export_names_it(trained_run, tmp_path):
    config, first = trained_run
    first_dir = tmp_path / "first" / "run"  # a copy, removed before the card is written
    shutil.copytree(first.model_dir, first_dir)
    shipped = tmp_path / "shipped" / "fer_resnet18"
    shutil.copytree(first.export_path.parent, shipped)
    metadata_file = shipped / "1" / "assets.extra" / "fer_keras.json"
    metadata_file.write_text(json.dumps({**json.loads(metadata_file.read_text()), "model_dir": str(first_dir)}))
    second = train.run(train.TrainConfig(
        model_dir=str(tmp_path / "cont"), export_dir=str(tmp_path / "exports"), init_from=str(shipped / "1"),
        **{**SMALL_RUN, "epochs": 1, "export_tta": "none"}))
    shutil.rmtree(first_dir)
    first_recipe = tmp_path / "first.cfg"
    first_recipe.write_text("--stem=imagenet\n--epochs=2\n")
    base = second.export_path.parent
    readme = model_card.write_card(second.model_dir, base, None, None, ("none",), init_recipe=first_recipe)
    text = readme.read_text()
    assert (f"started from the weights of epoch {first.best_epoch} of a 2-epoch run, as exported to "
            f"`fer_resnet18/1` (val (PublicTest) {100 * first.best_val_accuracy:.1f} % then; ") in text
    assert f"--flagfile={first_recipe} --model_dir=runs/run\n" in text
    assert "--init_from=runs/run --model_dir=runs/cont\n" in text
    assert (base / model_card.INIT_FLAGS).read_text() == (first.model_dir / "flags.txt").read_text()
    seconds = [r["seconds"] for r in read_history_csv(first.model_dir / "history.csv")]
    seconds += [r["seconds"] for r in read_history_csv(second.model_dir / "history.csv")]
    card = json.loads((base / model_card.CARD_JSON).read_text())
    assert card["training"]["total_wall_seconds"] == pytest.approx(sum(seconds))
    assert "flags" not in card["training"]["init"]["run"]  # they are in init_train_flags.txt
    # An export whose run is unknown: the card says what it cannot state, or refuses where it must.
    init_json = second.model_dir / "init.json"
    record = json.loads(init_json.read_text())
    record["run"].update(epochs=None, wall_seconds=None)
    init_json.write_text(json.dumps(record))
    text = model_card.write_card(second.model_dir, base, None, None, ("none",)).read_text()
    assert f"of a run, as exported to `fer_resnet18/1` (val (PublicTest) {100 * first.best_val_accuracy:.1f} % " \
           "then; its flags are in" in text
    assert "the first run's wall time is not recorded" in text
    record["run"]["flags"] = None
    init_json.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"cont started from the export .*fer_resnet18/1, which has no model card "
                                          r"of that version, of the run in .*first/run, which is not here"):
        model_card.build_card(second.model_dir, base, None, None, ("none",))
    # The export's card put beside it after the run started (an export copied without it): the card reads it there,
    # as long as the export still holds the weights the run started from.
    exported = json.loads(metadata_file.read_text())
    (shipped / model_card.CARD_JSON).write_text(json.dumps({"version": 1, "training": {
        "best_epoch": first.best_epoch, "config": {"model_dir": exported["train_config"]["model_dir"]}, "epochs": 2,
        "wall_seconds": 12.5, "init": None}}))
    (shipped / model_card.TRAIN_FLAGS).write_text((first.model_dir / "flags.txt").read_text())
    card, _ = model_card.build_card(second.model_dir, base, None, None, ("none",))
    start = card["training"]["init"]["run"]
    assert (start["epochs"], start["wall_seconds"]) == (2, 12.5)
    assert start["flags"] == (first.model_dir / "flags.txt").read_text()
    record["sha256"] = "0" * 64  # another model's weights in that folder now
    init_json.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="which has no model card of that version"):
        model_card.build_card(second.model_dir, base, None, None, ("none",))


def test_cli_refuses_an_unfinished_run_with_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    proc = run_tool("model_card", f"--model_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a training run with a finished epoch (no best.keras)" in proc.stderr


def test_the_shipped_model_is_the_default_and_has_learned():
    versions = [d for d in SHIPPED.iterdir() if d.is_dir() and d.name.isdigit()]
    assert len(versions) == 1, f"one shipped version at a time, found {sorted(d.name for d in versions)}"
    assert inference.resolve(None) == ("saved_model", versions[0])
    val = fer_data.load(None).split("val")  # the sample's 256 PublicTest rows
    result = evaluate(inference.load_predictor(None), val, "none", split_name="val")
    majority = max(np.bincount(val.labels, minlength=7)) / len(val)
    assert majority < 0.25 and result.accuracy > 0.45, result.accuracy


SAMPLE = 240  # of PublicTest's 3,589: all of them took the served ten-crop 319 s in the suite here (AVX2 EPYC)


@pytest.mark.slow
def test_best_keras_ten_crop_is_measured_with_the_served_crop_side(trained_run, tmp_path):
    # An export serving ten 42-pixel crops: the card's best.keras ten-crop row uses that side too, and says so.
    from fer_keras.export import export_from

    config, result = trained_run
    path, tta = export_from(result.model_dir, tmp_path, "m", 1, "tencrop", crop_size=42)
    assert tta == "tencrop" and inference.export_metadata(path)["crop_size"] == 42
    readme = model_card.write_card(result.model_dir, path.parent, None, None)
    card = json.loads((path.parent / model_card.CARD_JSON).read_text())
    _, val, _ = train.run_splits(fer_data.load(None), config)
    best = inference.load_predictor(result.model_dir / "best.keras")
    at = {crop: evaluate(best, val, "tencrop", split_name="val", crop_size=crop).probabilities for crop in (40, 42)}
    assert np.abs(at[40] - at[42]).max() > 1e-4  # the crop side changes what is measured
    assert card["tencrop_crop_size"] == 42
    assert card["best_keras"]["tencrop"]["num_correct"] == int((at[42].argmax(axis=1) == val.labels).sum())
    assert card["served"]["num_correct"] == card["best_keras"]["tencrop"]["num_correct"]
    text = readme.read_text()
    assert "| this export, as TF Serving runs it | tencrop, 42-pixel crops (built in) |" in text
    assert "| the run's best.keras | tencrop, 42-pixel crops (evaluate `--tta=tencrop --crop_size=42`) |" in text
    chosen = {"chosen": "tencrop", "accuracy": {"none": 0.5, "flip": 0.5, "tencrop": 0.625}, "split": "PublicTest",
              "num_images": 8, "tolerance_points": 0.25, "crop_size": 42,
              "tencrop_by_crop_size": {"40": 0.5, "42": 0.625}}
    assert ("(none 50.00 %, flip 50.00 %, tencrop, 42-pixel crops 62.50 %). Ten-crop was measured with 40- and "
            "42-pixel crops (50.00 / 62.50 %), and the most accurate side kept.") in model_card.render_markdown(
        {**card, "served_tta_selection": chosen})


def test_shipped_card_states_what_the_shipped_model_scores(fer2013_path):
    """The card's count is the sum of its per-image record, which is PublicTest image by image, and a fresh run of
    the served export on a random sample of those images reproduces their recorded probabilities."""
    card_path = SHIPPED / model_card.CARD_JSON
    assert card_path.is_file(), "no model card beside the shipped model"
    card = json.loads(card_path.read_text())
    val = fer_data.load(fer2013_path).split("val")
    rows = served_record(SHIPPED, card)
    assert [r["id"] for r in rows] == val.ids.tolist()
    assert [int(r["label"]) for r in rows] == val.labels.tolist()
    probabilities = np.array([[float(r[column]) for column in PROBABILITY_COLUMNS] for r in rows])
    predicted = np.array([int(r["predicted"]) for r in rows])
    np.testing.assert_array_equal(predicted, probabilities.argmax(axis=1))
    assert (int((predicted == val.labels).sum()), len(rows)) == (card["served"]["num_correct"],
                                                                 card["served"]["num_images"])
    sample = np.sort(np.random.default_rng(0).choice(len(val), SAMPLE, replace=False))
    fresh = evaluate(inference.load_predictor(None), val.take(sample), "none", split_name="val")
    # The record has 6 decimals; another CPU's kernels may sum in another order. Another model differs by far more.
    difference = np.abs(fresh.probabilities - probabilities[sample])
    print(f"largest difference from the record: {difference.max():.2e}")
    assert difference.max() < 1e-3, sample[difference.max(axis=1).argmax()]


def test_the_shipped_cards_readme_is_rendered_from_its_json():
    """The shipped README is written by model_card from model_card.json; a wording change must re-render it."""
    card = json.loads((SHIPPED / model_card.CARD_JSON).read_text())
    assert (SHIPPED / model_card.CARD_MD).read_text() == model_card.render_markdown(card), (
        "saved_models/fer_resnet18/README.md differs from model_card.render_markdown(model_card.json); re-render it")


def test_readme_carries_the_reference_table_of_the_model_card():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- references -->\n", "\n<!-- /references -->"
    assert start in readme and end in readme, "README.md lost its <!-- references --> markers"
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == model_card.references_markdown(), (
        "README.md's reference table differs from fer_keras.model_card.REFERENCES; paste "
        "`python -c 'from fer_keras import model_card; print(model_card.references_markdown())'`")
