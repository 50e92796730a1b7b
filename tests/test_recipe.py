"""Recipe chains (fer_keras.recipe): --init_from and --teachers naming recipes, trained first as stages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env

from fer_keras import recipe, train
from fer_keras.errors import ConfigError, FerError

# A stage small enough for a test: 64 images of the bundled sample, one epoch.
STAGE = ("--stem=imagenet\n--epochs=1\n--batch_size=32\n--max_train_examples=64\n--max_val_examples=32\n"
         "--learning_rate=0.01\n--warmup_epochs=0\n--verbose=0\n")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def top_config(tmp_path: Path, **kwargs) -> train.TrainConfig:
    small = dict(stem="imagenet", epochs=1, batch_size=32, max_train_examples=64, max_val_examples=32,
                 learning_rate=0.01, warmup_epochs=0, verbose=0, export=False, model_dir=str(tmp_path / "runs" / "top"))
    return train.TrainConfig(**{**small, **kwargs})


def test_the_shipped_models_recipe_lists_its_chain_teachers_and_starts_first(tmp_path):
    """flags/fer2013.cfg alone names every run behind version 11, each after what it needs."""
    proc = subprocess.run([sys.executable, "-m", "fer_keras.train", "--flagfile=flags/fer2013.cfg",
                           f"--model_dir={tmp_path / 'runs' / 'fer2013'}", "--dry_run"],
                          cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = [line.split(". ", 1)[1].split(" -> ")[0] for line in proc.stdout.splitlines() if line.startswith("  ")
              and " -> " in line]
    assert stages == [f"flags/fer2013_{name}.cfg" for name in (
        "300_bf16", "v5_bf16", "long_bf16", "200_bf16", "distill_300_bf16", "distill_v9_low_bf16")]
    assert f"-> {tmp_path / 'runs' / 'fer2013_300_bf16'}: new, 300 epochs" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"then {tmp_path / 'runs' / 'fer2013'}: new, 6 epochs")
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_stage_settings_are_the_recipes_with_the_runs_data_and_hardware_flags(tmp_path):
    stage = write(tmp_path / "first.cfg", STAGE + "--verbose=2\n--strategy=mirrored\n")
    config = top_config(tmp_path, init_from=stage, data="elsewhere.csv", verbose=1, cpu_devices=3,
                        strategy="mirrored", max_train_examples=96)
    [planned] = recipe.plan(config)
    assert planned.model_dir == tmp_path / "runs" / "first"
    assert (planned.config.data, planned.config.verbose, planned.config.cpu_devices) == ("elsewhere.csv", 1, 3)
    assert planned.config.max_train_examples == 64  # what is trained is the recipe's
    assert not planned.config.export and planned.state() == "new, 1 epochs"
    assert recipe.locate(config) == (str(tmp_path / "runs" / "first"), ())


@pytest.mark.parametrize("case, message", [
    ("cycle", "recipe cycle: "),
    ("missing", "no such recipe flagfile"),
    ("bad_flag", "--epochs must be >= 1"),
    ("same_folder", "would both train into"),
    ("own_folder", "would train into this run's own folder"),
])
def test_bad_chains_are_refused_before_anything_is_trained(tmp_path, case, message):
    (tmp_path / "other").mkdir()
    a, b = tmp_path / "a.cfg", tmp_path / "b.cfg"
    kwargs = {"init_from": str(a)}
    if case == "cycle":
        write(a, STAGE + f"--init_from={b}\n")
        write(b, STAGE + f"--teachers={a}\n")
    elif case == "bad_flag":
        write(a, STAGE + "--epochs=0\n")
    elif case == "same_folder":
        write(a, STAGE)
        kwargs["teachers"] = (write(tmp_path / "other" / "a.cfg", STAGE),)
    elif case == "own_folder":
        kwargs["init_from"] = write(tmp_path / "top.cfg", STAGE)
    with pytest.raises(ConfigError, match=message) as caught:
        recipe.plan(top_config(tmp_path, **kwargs))
    assert "\n" not in str(caught.value)
    if case in ("bad_flag", "missing"):
        assert str(a) in str(caught.value)
    assert not (tmp_path / "runs").exists()


def test_multi_worker_training_asks_for_the_stages_to_be_trained_first(tmp_path):
    config = top_config(tmp_path, init_from=write(tmp_path / "first.cfg", STAGE), strategy="multi_worker")
    with pytest.raises(ConfigError, match=r"multi_worker trains no recipe stages \(every worker would start them\): "
                                          r"train .*first\.cfg first, e\.g\. python -m fer_keras\.train --flagfile="):
        recipe.train_stages(config, recipe.plan(config))


def test_a_failing_stage_stops_the_chain_before_the_run_writes_anything(tmp_path, capfd):
    config = top_config(tmp_path, init_from=write(tmp_path / "first.cfg", STAGE + "--max_train_examples=8\n"))
    with pytest.raises(FerError, match=r"recipe stage .*first\.cfg \(.*first\) stopped with exit code 2"):
        train.run(config)
    assert "fewer than one batch of 32" in capfd.readouterr().err  # the stage's own one-line error
    assert not (tmp_path / "runs" / "top").exists()


@pytest.mark.slow
def test_a_chain_trains_its_stage_once_and_starts_and_distils_from_it(tmp_path, capfd):
    stage = write(tmp_path / "first.cfg", STAGE)
    config = top_config(tmp_path, init_from=stage, teachers=(stage,), distill_weight=0.5)
    train.run(config)
    out = capfd.readouterr().out
    folder = tmp_path / "runs" / "first"
    assert f"recipe stage 1/1 {stage} ({folder}): new, 1 epochs" in out
    assert (folder / "best.keras").is_file() and json.loads((folder / "config.json").read_text())["export"] is False
    top = tmp_path / "runs" / "top"
    assert json.loads((top / "config.json").read_text())["init_from"] == stage  # the recipe, as given
    assert json.loads((top / "init.json").read_text())["path"] == str((folder / "best.keras").resolve())
    [teacher] = json.loads((top / "teachers.json").read_text())
    assert teacher["path"] == str((folder / "best.keras").resolve())

    # Another run of the chain finds the stage finished and trains only itself.
    again = top_config(tmp_path, init_from=stage, teachers=(stage,), model_dir=str(tmp_path / "runs" / "again"))
    assert f"  1. {stage} -> {folder}: done\n" in train.dry_run(again)
    assert train.dry_run(config).startswith(f"{top} has started, so it trains no recipe stage")
    train.run(again)
    out = capfd.readouterr().out
    assert f"recipe stage 1/1 {stage} ({folder}): done" in out and "fer_keras" in out

    # A finished stage whose recipe has changed since is refused before anything trains.
    write(tmp_path / "first.cfg", STAGE + "--learning_rate=0.5\n")
    with pytest.raises(ConfigError, match=r"learning_rate: 0\.01 -> 0\.5\); move it away to train the stage again"):
        recipe.plan(config)
    write(tmp_path / "first.cfg", STAGE)

    # A run that has started needs no stage: with the stage and its recipe gone, a rerun neither trains it nor fails.
    shutil.move(folder, tmp_path / "moved")
    Path(stage).unlink()
    train.run(config)
    assert "recipe stage" not in capfd.readouterr().out and not folder.exists()



@pytest.mark.parametrize("recipe_file, flags_file", [
    ("flags/fer2013.cfg", "train_flags.txt"),  # version 11's run
    ("flags/fer2013_distill_v9_low_bf16.cfg", "init_train_flags.txt"),  # version 10's
    ("flags/fer2013_distill_300_bf16.cfg", "init2_train_flags.txt"),  # version 9's
    ("flags/fer2013_300_bf16.cfg", "init3_train_flags.txt"),  # the 300-epoch run
])
def test_each_stage_of_the_shipped_chain_has_the_settings_its_run_recorded(recipe_file, flags_file, monkeypatch):
    """The runs behind version 11 were made one command at a time, from exports and folders the recipes no longer
    name: their recipes must still train what those runs trained (paths and run-time flags aside)."""
    monkeypatch.chdir(REPO)

    def settings(*args: str) -> dict:
        config = train.config_from_args(args).to_json()
        return {k: v for k, v in config.items()
                if k not in {*train.RESUMABLE_FIELDS, "init_from", "teachers"}}

    recorded = settings(f"--flagfile={REPO / 'saved_models' / 'fer_resnet18' / flags_file}")
    assert settings(f"--flagfile={recipe_file}") == recorded
