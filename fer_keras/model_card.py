"""The model card of a shipped export, written from measurements rather than by hand.

``python -m fer_keras.model_card --model_dir=RUN --export=saved_models/fer_resnet18/4 --data=fer2013.csv.gz
--recipe=flags/fer2013.cfg`` evaluates the export as TF Serving runs it (its built-in test-time
augmentation included) and the run's ``best.keras`` with each TTA of the evaluate tool, on the
validation split the run selected its epoch on (PublicTest), and writes beside the versions:

* ``model_card.json``: every figure, with split, image count and TTA;
* ``README.md``: the card (command, recipe, epochs, wall time, machine, accuracy table, figures);
* ``history.png`` and ``train_flags.txt`` (from the run), ``confusion_matrix.png`` (of the served export);
* ``served_predictions.csv``: the served export's prediction for every image of that split, in the evaluate
  tool's format, so that a check of the card can re-run a sample of images instead of the whole split;
* ``init_train_flags.txt``: for a run started with ``--init_from`` another run (or its export), that run's
  flags; ``init2_train_flags.txt``, ... for the runs before it, when that run had started from one too.

The recipe flagfile is checked against the run's recorded flags, so the card's "reproduce with" line
cannot drift from what was actually trained. A run started from another run's weights (``--init_from`` the
run or its export) gets every command of the chain, ``--init_recipe`` checked against the runs before it
(nearest first), and the wall time of all of them. TF Serving only loads integer version folders, so these
files do not disturb serving.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from absl import flags

from fer_keras import CLASS_NAMES, __version__, cli
from fer_keras import data as fer_data
from fer_keras.errors import ConfigError, ModelError
from fer_keras.history import (
    atomic_write_text,
    best_row,
    history_facts,
    is_version_name,
    plot_history,
    read_flags_text,
    read_init,
    read_run,
    read_start,
    run_record,
    unrecorded_start,
)
from fer_keras.tta import DEFAULT_CROP_SIZE, NO_TTA_SIGNATURE, TTA_MODES, num_views

CARD_JSON = "model_card.json"
CARD_MD = "README.md"
TRAIN_FLAGS = "train_flags.txt"
SERVED_PREDICTIONS = "served_predictions.csv"
INIT_FLAGS = "init_train_flags.txt"

# Published figures the card and README.md compare against (issue "Accuracy"): (what, accuracy %, split, note).
# README.md carries references_markdown() verbatim (tests/test_model_card.py checks), so they live here only.
REFERENCES = (
    ("Original PyTorch course report (ResNet-18)", "~60", "validation", "heavy overfitting"),
    ("Human accuracy", "~65", "-", ""),
    ("2013 challenge winner", "71.2", "PrivateTest", ""),
    ("PyTorch twin, 7×7/2 + max-pool stem, 60 epochs (GPU)", "66.0", "PublicTest",
     "PrivateTest 67.3 / 68.2 / 68.9 none / flip / ten-crop"),
    ("PyTorch twin, 3×3 + 2×2 pool stem, 60 epochs (GPU)", "69.0", "PublicTest", "PrivateTest 68.9 / 70.7 / 71.6"),
    ("Published ResNet-18 recipes (~300 epochs, 40×40 crops, mixup, ten-crop TTA)", "72.6–73.7",
     "PrivateTest", "the higher figures chose checkpoint or schedule on PrivateTest itself"),
    ("Published VGG-style recipe", "73.28", "PublicTest", "checkpoint selected on PrivateTest"),
)


def references_markdown() -> str:
    """The reference figures as a Markdown table (the model card's and README.md's)."""
    lines = ["| reference | accuracy % | split | note |", "| --- | ---: | --- | --- |"]
    lines += [f"| {what} | {acc} | {where} | {note} |" for what, acc, where, note in REFERENCES]
    return "\n".join(lines)


def _flag_lines(path: Path, including: tuple[Path, ...] = ()) -> dict[str, str]:
    """``--name=value`` pairs of a flagfile, nested ``--flagfile`` lines expanded (later lines win).
    ``including`` are the flagfiles on the way here: only a cycle is an error, not one base read twice."""
    if path.resolve() in including:
        raise ConfigError(f"{path}: flagfile includes itself")
    including = (*including, path.resolve())
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe flagfile: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a recipe flagfile (not UTF-8 text: {e.reason} at byte {e.start})") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):
            raise ConfigError(f"{path}: line {number}: expected --flag or --flag=value, got {line!r}")
        name, _, value = line[2:].partition("=")
        if name == "flagfile":
            nested = Path(value)
            values.update(_flag_lines(nested if nested.is_absolute() else Path.cwd() / nested, including))
        else:
            values[name] = value if "=" in line else "True"  # a bare --noX is resolved against the run
    return values


def _same_value(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return {a.lower(), b.lower()} <= {"true", "1"} or {a.lower(), b.lower()} <= {"false", "0"}


def check_recipe(recipe: Path, run_flags: Path) -> dict[str, str]:
    """The recipe's flags; a ConfigError listing every flag where the run (its ``flags.txt``) used another value."""
    return check_recipe_text(recipe, read_flags_text(run_flags), run_flags.parent)


def check_recipe_text(recipe: Path, flags_text: str, run_dir: str | os.PathLike) -> dict[str, str]:
    """:func:`check_recipe` for a run's flags as text (``init.json`` keeps the start run's), ``run_dir`` naming
    the run in errors."""
    wanted = _flag_lines(recipe)
    recorded = {}
    for line in flags_text.splitlines():
        if line.startswith("--") and "=" in line:
            name, _, value = line[2:].partition("=")
            recorded[name] = value
    for name in [k for k in wanted if k.startswith("no") and k not in recorded and k[2:] in recorded]:
        wanted[name[2:]] = "False" if _same_value(wanted.pop(name), "True") else "True"
    # Paths (data, the run a --init_from run started from, teachers) differ between machines; they are not the recipe.
    ignored = {"data", "init_from", "teachers", "model_dir", "export_dir", "export_name", "export_version", "verbose"}
    diffs = [f"--{k}: recipe {v}, run {recorded.get(k, '(unset)')}" for k, v in sorted(wanted.items())
             if k not in ignored and not _same_value(v, recorded.get(k, ""))]
    if bool(wanted.get("init_from")) != bool(recorded.get("init_from")):  # the path may differ, not whether
        diffs.append(f"--init_from: recipe {wanted.get('init_from') or '(unset)'}, "
                     f"run {recorded.get('init_from') or '(unset)'}")
    counts = [len([p for p in d.get("teachers", "").split(",") if p]) for d in (wanted, recorded)]
    if counts[0] != counts[1]:  # the paths may differ, not how many teachers
        diffs.append(f"--teachers: recipe {counts[0]}, run {counts[1]} teacher(s)")
    if diffs:
        raise ConfigError(f"{recipe}: the run in {run_dir} was not trained with this recipe ("
                          + "; ".join(diffs) + ")")
    return wanted


def _folder_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _accuracy_entry(result) -> dict:
    return {"accuracy": result.accuracy, "num_correct": result.num_correct, "num_images": result.num_images,
            "macro_f1": result.macro_f1, "split": result.split, "split_label": result.split_label}


MAX_CHAIN = 16  # a guard against a cycle of init records, far above any real chain of restarts


def init_flags_name(depth: int) -> str:
    """The card's file of the flags of the run ``depth`` steps back: the run the model started from (1), the run
    that one started from (2), ..."""
    return INIT_FLAGS if depth == 1 else f"init{depth}_{TRAIN_FLAGS}"


def start_chain(init: dict | None) -> list[dict]:
    """The ``init.json`` records of the runs a model descends from, nearest first. A record written before runs
    kept their own start has no ``run["init"]``: it is completed, once and in place, from that run's folder
    while the folder is here, else from its recorded configuration (:func:`history.read_start`)."""
    chain: list[dict] = []
    while isinstance(init, dict) and isinstance(init.get("run"), dict) and len(chain) < MAX_CHAIN:
        chain.append(init)
        run = init["run"]
        if "init" not in run:
            run["init"] = read_start(run.get("model_dir"), run.get("config"))
        init = run["init"]
    return chain


def card_init_with_flags(init: dict | None, base: Path) -> dict | None:
    """A card's ``init`` record with each run's flags read back from the files the card wrote beside it."""
    for depth, record in enumerate(start_chain(init), start=1):
        path = Path(base) / (record["run"].get("flags_file") or init_flags_name(depth))
        if record["run"].get("flags") is None and path.is_file():
            record["run"]["flags"] = read_flags_text(path)
    return init


def export_start_run(export_dir: Path, metadata: dict) -> dict | None:
    """What is known of the run an export came from: the run directory itself while it is here and still holds
    the exported epoch, else the export's metadata and, when it describes this export, the model card beside it
    (epochs, wall time, the run's flags). None for an export of a bare .keras file."""
    config = metadata.get("train_config")
    if not isinstance(config, dict):
        return None
    if metadata.get("model_dir"):
        run = run_record(Path(metadata["model_dir"]))
        if run is not None and run["best_epoch"] == metadata.get("best_epoch"):
            return run
    run = {"model_dir": metadata.get("model_dir"), "epochs": None, "best_epoch": metadata.get("best_epoch"),
           "best_val_accuracy": metadata.get("val_accuracy"), "wall_seconds": None, "config": config,
           "flags": None}
    base = export_dir.parent
    try:
        card = json.loads((base / CARD_JSON).read_text())
        flags_text = (base / TRAIN_FLAGS).read_text()
    except (OSError, ValueError):
        return run
    training = card.get("training") if isinstance(card, dict) else None
    # The card of this very export: a copied or renamed folder keeps it, another version's card does not match.
    if (isinstance(training, dict) and is_version_name(export_dir.name) and card.get("version") == int(export_dir.name)
            and training.get("best_epoch") == run["best_epoch"]
            and (training.get("config") or {}).get("model_dir") == config.get("model_dir")):
        run.update(epochs=training.get("epochs"), wall_seconds=training.get("wall_seconds"), flags=flags_text,
                   init=card_init_with_flags(training.get("init"), base))
        if run["best_val_accuracy"] is None:
            run["best_val_accuracy"] = training.get("best_epoch_val_accuracy")
    return run


def unknown_origin(init: dict | None, chain: list[dict]) -> dict | None:
    """The ``init.json`` record of the weights the oldest known run of ``chain`` (:func:`start_chain` of
    ``init``) started from when their training is not recorded (a bare ``.keras`` file, or a run whose own
    record is gone: :func:`history.unrecorded_start`), else None."""
    oldest = chain[-1]["run"].get("init") if chain else init
    return oldest if isinstance(oldest, dict) and not isinstance(oldest.get("run"), dict) else None


def _start_name(init: dict) -> str:
    """How the card names the weights a run started from: an export as ``NAME/VERSION``, else the file or folder."""
    path = Path(init["path"])
    return f"{path.parent.name}/{path.name}" if init.get("export") else path.name


def _total_wall(wall: float, init: dict | None) -> float | None:
    """The run's wall time plus those of the runs it descends from; None when one of them is unknown, or when
    the chain starts from weights whose training is not recorded."""
    runs = _lineage({"wall_seconds": wall, "init": init})
    return None if runs is None else sum(r["wall_seconds"] for r in runs)


def _lineage(run: dict) -> list[dict] | None:
    """A run record and the run records it descends from (``--init_from``); None when one's wall time is not
    recorded, or the oldest started from weights whose training is not."""
    init = run.get("init")
    chain = start_chain(init)
    runs = [run] + [record["run"] for record in chain]
    if any(r.get("wall_seconds") is None for r in runs) or unknown_origin(init, chain):
        return None
    return runs


def _wall_with_teachers(student: dict, teachers: list[dict] | None) -> float | None:
    """The wall time of every run that went into a distilled model: its own, the runs it descends from, and its
    teachers' with theirs, each run counted once (a teacher may be the model the student started from); None
    for a model without teachers, or when one of those runs' time is not recorded."""
    if not teachers:
        return None
    lineages = [_lineage(student)] + [_lineage(t["run"]) if isinstance(t.get("run"), dict) else None
                                      for t in teachers]
    if None in lineages:
        return None
    runs = {r.get("model_dir") or id(r): r["wall_seconds"] for lineage in lineages for r in lineage}
    return sum(runs.values())


def _check_export_of_run(metadata: dict, export: Path, run_dir: Path, best: dict, selection_name: str) -> None:
    """Refuses an export whose metadata records another run's best model: the card would put this run's recipe and
    history beside that model's accuracy (by epoch, accuracy and split, not by path: run folders move)."""
    recorded = {"best_epoch": metadata.get("best_epoch"), "val_accuracy": metadata.get("val_accuracy"),
                "val_split": metadata.get("val_split")}
    if recorded["best_epoch"] is None:
        raise ConfigError(f"{export}: its metadata does not say which run's epoch it holds, so it cannot be "
                          f"carded as {run_dir}'s (export the run with python -m fer_keras.export --model=RUN)")
    here = {"best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "val_split": selection_name}
    differ = [f"{key} {recorded[key]!r} (run: {here[key]!r})" for key in here
              if recorded[key] is not None and not (
                  math.isclose(recorded[key], here[key], abs_tol=5e-6) if key == "val_accuracy"
                  else recorded[key] == here[key])]
    if differ:
        raise ConfigError(f"{export} holds another model than {run_dir}'s best epoch: "
                          f"{', '.join(differ)}; pass the export made from this run")


def build_card(run_dir: Path, export: Path, data: str | None, recipe: Path | None,
               tta_modes: Sequence[str] = TTA_MODES, batch_size: int = 256,
               init_recipe: Path | Sequence[Path] | None = None) -> tuple[dict, object]:
    """Measures everything the card states; returns (card, the served export's EvalResult). ``init_recipe``
    (one flagfile, or one per run going back) is checked against the run the model started from
    (``--init_from``), the next against the run that one started from, and so on."""
    from fer_keras import inference
    from fer_keras.benchmark import cpu_info
    from fer_keras.evaluate import evaluate
    from fer_keras.train import TrainConfig

    run_dir, export = Path(run_dir), Path(export)
    recorded, history = read_run(run_dir, ("best.keras", "history.csv", "config.json", "flags.txt"))
    kind, export = inference.resolve(export)
    if kind != "saved_model":
        raise ConfigError(f"{export}: --export must be a SavedModel export, not a .keras file")
    if not is_version_name(export.name):  # the card goes beside the versions, into NAME/
        raise ConfigError(f"{export}: not a version folder of TF Serving's NAME/VERSION layout (VERSION a number); "
                          "give --export=NAME or NAME/VERSION")
    config = TrainConfig.recorded(recorded)
    recipe_flags = check_recipe(recipe, run_dir / "flags.txt") if recipe else None
    facts = history_facts(history)
    init = read_init(run_dir) or unrecorded_start(recorded)  # init.json gone: the run still did not start afresh
    chain = start_chain(init)
    init_recipes = [init_recipe] if isinstance(init_recipe, (str, Path)) else list(init_recipe or [])
    if len(init_recipes) > len(chain):
        raise ConfigError(f"--init_recipe names {len(init_recipes)} flagfile(s), but {run_dir} descends from "
                          f"{len(chain)} earlier run(s)" + ("" if chain else " (it did not start from another "
                                                            "run's weights)"))
    for depth, record in enumerate(chain, start=1):
        start = record["run"]
        if not start.get("flags"):  # not recorded at the start (an older init.json, or an export without its card)
            first_flags = Path(start.get("model_dir") or "") / "flags.txt"
            if start.get("model_dir") and first_flags.is_file():
                start["flags"] = read_flags_text(first_flags)
            elif record.get("export") and (found := _export_card_run(record)):
                start.update(found)
            elif depth == 1:
                origin = (f"the export {record['path']}, which has no model card of that version, of the run in "
                          f"{start.get('model_dir')}, which is not here" if record.get("export") else
                          f"the run in {first_flags.parent}, which is gone (no flags.txt)")
                raise ConfigError(f"{run_dir} started from {origin}: the card states how that run was made")
        if depth <= len(init_recipes):
            if not start.get("flags"):
                raise ConfigError(f"--init_recipe={init_recipes[depth - 1]}: the flags of {start.get('model_dir')} "
                                  "were not recorded, so the recipe cannot be checked")
            start["recipe"] = str(init_recipes[depth - 1])
            start["recipe_flags"] = check_recipe_text(init_recipes[depth - 1], start["flags"], start["model_dir"])
    wall = facts["wall_seconds"]

    from fer_keras.export import selection_split

    split, selection_name, source = selection_split(data, recorded, run_dir)
    split_name = "val"
    served = inference.load_predictor(export)
    _check_export_of_run(served.metadata, export, run_dir, best_row(history), selection_name)
    # A run on data without PublicTest chose its epoch on its own hold-out: every figure names that, as the report.
    label = None if selection_name == "PublicTest" else f"val ({selection_name} of train)"
    served_result = evaluate(served, split, "none", batch_size, split_name=split_name, split_label=label)
    keras_model = inference.load_predictor(run_dir / "best.keras")
    # best.keras's ten-crop is measured with the served export's crop side, so the two rows compare like with like.
    crop = (served.metadata.get("tta") == "tencrop" and served.metadata.get("crop_size")) or DEFAULT_CROP_SIZE
    per_tta = {mode: _accuracy_entry(evaluate(keras_model, split, mode, batch_size, split_name=split_name,
                                              split_label=label, crop_size=crop))
               for mode in tta_modes}
    import keras
    import tensorflow as tf

    cpu = cpu_info()
    teachers = _teachers(run_dir, config)
    card = {
        "name": export.parent.name,
        "version": int(export.name),
        "export_size_mb": round(_folder_size_mb(export), 1),
        "served_tta": served.metadata.get("tta", "none"),
        "serving_checks": bool(served.metadata.get("serving_checks")),
        "signatures": list(served.metadata.get("signatures", [])),  # not recorded before session 26
        "served_tta_selection": served.metadata.get("tta_selection"),
        "data": source,
        "selection_split": fer_data.split_label(split_name) if selection_name == "PublicTest" else selection_name,
        "served": _accuracy_entry(served_result),
        "best_keras": per_tta,
        "tencrop_crop_size": crop,
        "per_class_served": served_result.to_json()["per_class"],
        "served_predictions": SERVED_PREDICTIONS,  # written beside the card by write_card
        "training": {
            "recipe": str(recipe) if recipe else None,
            "recipe_flags": recipe_flags,
            "config": config,
            **facts,
            "init": init,
            "teachers": teachers,
            "total_wall_seconds": _total_wall(wall, init),
            "wall_seconds_with_teachers": _wall_with_teachers(
                {"model_dir": str(run_dir.resolve()), "wall_seconds": wall, "init": init}, teachers),
        },
        "machine": {"cpu": cpu["model"], "cores": cpu["cores"], "simd": cpu["simd"]},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "fer_keras": __version__},
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }
    return card, served_result


def _export_card_run(record: dict) -> dict | None:
    """What the model card beside an export says of its run (epochs, wall time, flags, its own start), when the
    card came after the ``init.json`` that names the export (the export was copied without it, and it was put
    back) and the export still holds the same weights; None otherwise."""
    from fer_keras import inference

    path = Path(record["path"])
    try:
        same = inference.model_sha256("saved_model", path) == record.get("sha256")
    except (OSError, ModelError):
        return None
    run = export_start_run(path, inference.export_metadata(path)) if same else None
    if not run or not run.get("flags"):
        return None
    return {k: run[k] for k in ("epochs", "wall_seconds", "flags", "init") if k in run}


def _teachers(run_dir: Path, config: dict) -> list[dict] | None:
    """The run's teachers (``--teachers``) as ``teachers.json`` records them, or by path alone when it is gone."""
    if not config.get("teachers"):
        return None
    from fer_keras import distill

    try:
        records = json.loads((run_dir / distill.RECORD_FILE).read_text())
    except (OSError, ValueError):
        records = None
    if isinstance(records, list) and len(records) == len(config["teachers"]) and all(
            isinstance(r, dict) and r.get("path") for r in records):
        for record in records:
            if "run" not in record:  # recorded before teachers.json kept it
                record["run"] = distill.teacher_run(record)
        return records
    return [{"path": p} for p in config["teachers"]]


def teacher_flags_name(index: int, depth: int = 0) -> str:
    """The card's file of the flags of the run that trained teacher ``index`` (from 1), or of the run ``depth``
    steps back from it (the run that run started from: 1, ...)."""
    return f"teacher{index}_{init_flags_name(depth) if depth else TRAIN_FLAGS}"


def _teacher_line(training: dict, c: dict) -> str:
    """The card's line on a distilled model's targets: each teacher, how its run made it, and what all cost."""
    described = []
    teachers = training["teachers"]
    for teacher in teachers:
        path = Path(teacher["path"])
        name = f"{path.parent.name}/{path.name}" if teacher.get("kind") == "saved_model" else str(path)
        facts = [f"TTA {teacher['tta']}"] if teacher.get("tta") else []
        if teacher.get("val_accuracy") is not None:
            split = teacher.get("val_split") or "its validation split"
            facts.append(f"{split} {100 * teacher['val_accuracy']:.1f} % at its selection")
        run = teacher.get("run") if isinstance(teacher.get("run"), dict) else {}
        if run.get("epochs") and run.get("best_epoch") is not None:
            facts.append(f"epoch {run['best_epoch']} of a {run['epochs']}-epoch run"
                         + (f" of {run['wall_seconds'] / 3600:.2f} h" if run.get("wall_seconds") is not None else "")
                         + (", started from other weights" if run.get("init") else ""))
        if run.get("flags_file"):
            facts.append(f"its flags are in `{run['flags_file']}`")
        kept = [r["run"]["flags_file"] for r in start_chain(run.get("init")) if r["run"].get("flags_file")]
        if kept:
            facts.append("the flags of the runs behind its start are in " + ", ".join(f"`{k}`" for k in kept))
        facts += [f"SHA-256 {teacher['sha256'][:12]}…"] if teacher.get("sha256") else ["not recorded beyond its path"]
        described.append(f"`{name}` ({'; '.join(facts)})")
    total = training.get("wall_seconds_with_teachers")
    runs = "this run, the runs it started from" if training.get("init") else "this run"
    cost = (f"; {runs} and its teachers' runs (with the runs they started from), each counted once, took "
            f"{total / 3600:.2f} h in all" if total is not None else
            "; the teachers' training time is not all recorded")
    w, s = c["distill_weight"], c.get("label_smoothing") or 0.0
    # Label smoothing applies to the soft target as to a one-hot label: (1 - s) x target + s / 7.
    smoothed = (f", then label smoothing {s:g} makes it {(1 - s) * (1 - w):g} × the label + {(1 - s) * w:g} × the "
                f"teachers' probabilities + {s / 7:.4g} on every class" if s else "")
    return (f"- distilled: each training target is {1 - w:g} × the one-hot label + "
            f"{w:g} × the mean probabilities (temperature {c['distill_temperature']:g}) of "
            f"{len(teachers)} teacher(s), computed once on the un-augmented training images{smoothed}: "
            + ", ".join(described) + cost + ".")


def _pct(entry: dict) -> str:
    return f"{100 * entry['accuracy']:.1f} % ({entry['num_correct']:,} / {entry['num_images']:,})"


def _epoch_range(training: dict) -> str:
    low, high = training.get("epoch_seconds") or (None, None)
    if low is None:  # a card written before the range was recorded
        return f"{training['wall_seconds'] / max(training['epochs'], 1):,.0f} s on average"
    return f"{low:,.0f} s" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f} s"


def _tta_name(mode: str, crop: int | None) -> str:
    """A TTA mode as the card names it: ten-crop with its crop side, which a card made before it kept one lacks."""
    return f"{mode}, {crop}-pixel crops" if mode == "tencrop" and crop else mode


def render_markdown(card: dict) -> str:
    crop = card.get("tencrop_crop_size")
    t = card["training"]
    c = t["config"]
    split = card["selection_split"]
    hours = t["wall_seconds"] / 3600
    recipe = t["recipe"] or TRAIN_FLAGS
    lines = [
        f"# {card['name']} — ResNet-18 for FER2013 (version {card['version']})",
        "",
        f"A ResNet-18 (`{c['stem']}` stem, {c['input_channels']} input channel(s)"
        + (f", seeing the central {c['input_crop']}×{c['input_crop']} pixels" if c.get("input_crop") else "")
        + f") trained by fer_keras "
        f"{card['versions']['fer_keras']} on the FER2013 Training rows only; every choice (epoch, TTA) was made "
        f"on {split}. The withheld PrivateTest rows were never used. Classes: "
        + ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES)) + ".",
        "",
        "## Accuracy",
        "",
        f"| model | test-time augmentation | {split} accuracy | macro F1 |",
        "| --- | --- | ---: | ---: |",
        f"| this export, as TF Serving runs it | {_tta_name(card['served_tta'], crop)} (built in) "
        f"| {_pct(card['served'])} | {card['served']['macro_f1']:.3f} |",
    ]
    for mode, entry in card["best_keras"].items():
        flags = f"--tta={mode}" + (f" --crop_size={crop}" if mode == "tencrop" and crop else "")
        lines.append(f"| the run's best.keras | {_tta_name(mode, crop)} (evaluate `{flags}`) | {_pct(entry)} "
                     f"| {entry['macro_f1']:.3f} |")
    chosen = card.get("served_tta_selection")
    if chosen:
        # The figures that choice compared, as the export recorded them (an export made before session 12
        # measured a mixed-precision model as trained, so they may differ from the table's float32 ones).
        compared = ", ".join(f"{_tta_name(mode, crop and chosen.get('crop_size'))} {100 * acc:.2f} %"
                             for mode, acc in (chosen.get("accuracy") or {}).items())
        sides = list((chosen.get("tencrop_by_crop_size") or {}).items())
        measured = ""
        if len(sides) > 1:  # --crop_size with several sides: the export kept the most accurate
            listed = ", ".join(f"{c}-" for c, _ in sides[:-1]) + f" and {sides[-1][0]}-pixel"
            measured = (f" Ten-crop was measured with {listed} crops ("
                        f"{' / '.join(f'{100 * a:.2f}' for _, a in sides)} %), and the most accurate side kept.")
        lines += ["", f"The built-in TTA was chosen by `--export_tta=auto` on {chosen['split']} "
                      f"({chosen['num_images']:,} images): the cheapest of none, flip and ten-crop within "
                      f"{chosen['tolerance_points']:g} points of the best" + (f" ({compared})." if compared else ".")
                  + measured]
    lines += [
        "",
        f"{split} also chose the epoch, so these figures are optimistic by the selection; the PrivateTest rows "
        "are withheld from this project and scored independently of it. Per class (served):",
        "",
        "| class | precision | recall | F1 | images |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in card["per_class_served"].items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines += [
        "",
        "For comparison (single networks, no extra data; each figure on the split named):",
        "",
        references_markdown(),
    ]
    init = t.get("init")
    chain = start_chain(init)
    origin = unknown_origin(init, chain)
    # Oldest run first; each later run starts from the one before it (the oldest from unrecorded weights, if any).
    dirs = [f"runs/{Path(r['run'].get('model_dir') or f'run{depth}').name}"
            for depth, r in enumerate(chain, start=1)][::-1] + [f"runs/{Path(c['model_dir']).name}"]
    recipes = [r["run"].get("recipe") or r["run"].get("flags_file") or "(its flags were not recorded)"
               for r in chain][::-1]
    starts = [_start_name(origin)] if origin else [""]
    starts += dirs[:-1]
    commands = [f"python -m fer_keras.train --data=fer2013.csv.gz --flagfile={flagfile}"
                + (f" --init_from={starts[i]}" if starts[i] else "")
                + (f" --model_dir={dirs[i]}" if chain else "")
                for i, flagfile in enumerate(recipes + [recipe])]
    lines += ["", "## How it was trained", "", "```bash", *commands, "```", ""]
    if chain:
        described = []
        for record in chain:
            run = record["run"]
            path = Path(record["path"])
            epoch = f"epoch {run['best_epoch']}" if run.get("best_epoch") is not None else "the best epoch"
            length = f"a {run['epochs']}-epoch run" if run.get("epochs") else "a run"
            via = f", as exported to `{path.parent.name}/{path.name}`" if record.get("export") else ""
            then = [f"{split} {100 * run['best_val_accuracy']:.1f} % then"] if run.get("best_val_accuracy") else []
            then += [f"{run['wall_seconds'] / 3600:.2f} h"] if run.get("wall_seconds") is not None else []
            kept = (f"its flags are in `{run['flags_file']}`" if run.get("flags_file") else
                    "its flags were not recorded")
            described.append(f"{epoch} of {length}{via} ({'; '.join(then + [kept])})")
        if origin:
            described.append(f"`{_start_name(origin)}` (how those weights were trained is not recorded)")
        runs = "both runs" if len(chain) == 1 else f"all {len(chain) + 1} runs"
        total = (f"{runs} together took {t['total_wall_seconds'] / 3600:.2f} h"
                 if t.get("total_wall_seconds") is not None else
                 "the total wall time is unknown" if origin else
                 f"{'the first' if len(chain) == 1 else 'an earlier'} run's wall time is not recorded")
        lines.append(f"- started from the weights of {', which started from the weights of '.join(described)}, "
                     f"not from random weights; {total}.")
    elif init:
        known = (f"SHA-256 {init['sha256'][:12]}…" if init.get("sha256") else
                 "how those weights were trained is not recorded")
        lines.append(f"- started from the weights of `{_start_name(init)}` ({known}), not from random weights.")
    lines += [
        f"- {t['epochs']} epochs, batch {c['batch_size']}, {c['optimizer']} lr {c['learning_rate']} "
        f"{c['schedule']} (warm-up {c['warmup_epochs']}"
        + (f"; momentum {c['momentum']} cycling down to {c.get('base_momentum')} at the peak"
           if c.get("cycle_momentum") else "")
        + f"), decoupled weight decay {c['weight_decay']} on "
        f"{'all parameters' if c.get('decay_norm_and_bias') else 'kernels only'}, label smoothing "
        f"{c['label_smoothing']}, dropout {c['dropout']}, augmentation flip={c['flip']} shift={c['shift']} "
        f"rotation={c['rotation']}° zoom={c['zoom']} erasing={c['erasing']} "
        f"(fill {c.get('erasing_fill', 'noise')}, up to {c.get('erasing_max_area', 0.25)} of the image) "
        f"mixup={c['mixup']} fill_mode={c.get('fill_mode', 'reflect')}, "
        f"precision {c['precision']}, "
        f"seed {c['seed']}; every flag the run used is in `{TRAIN_FLAGS}`.",
        *([_teacher_line(t, c)] if t.get("teachers") else []),
        f"- best epoch {t['best_epoch']} ({split} {100 * t['best_epoch_val_accuracy']:.1f} % during training; "
        f"final train accuracy {100 * t['final_train_accuracy']:.1f} % on augmented batches"
        + (", against the soft targets' top class" if t.get("teachers") else "") + ").",
        f"- wall time {hours:.2f} h, the sum of its epochs' times ({_epoch_range(t)} each; epochs cut short by a "
        f"stop or a kill are not counted) on {card['machine']['cpu']}, "
        f"{card['machine']['cores']} core(s), {card['machine']['simd']}; TensorFlow "
        f"{card['versions']['tensorflow']}, Keras {card['versions']['keras']}.",
        "",
        "![training history](history.png)",
        "",
        f"![confusion matrix of the served export on {split}](confusion_matrix.png)",
        "",
        *([f"`{card['served_predictions']}` holds the served export's prediction for each of the "
           f"{card['served']['num_images']:,} images of {split}, in the evaluate tool's columns: `id` numbers the data "
           "file's records from 0, then come the true and predicted class and the seven probabilities.", ""]
          if card.get("served_predictions") else []),
        "## Serving",
        "",
        f"`{card['name']}/{card['version']}/` is a TF Serving SavedModel ({card['export_size_mb']} MB): "
        "`serving_default` takes float32 `pixels` [N, 48, 48, 1] in 0–255, `serving_uint8` the same as uint8; "
        "each returns `probabilities`, `class_id`, `class_name` and `logits`. "
        + (f"`{NO_TTA_SIGNATURE}` takes the same float32 pixels and answers from the image alone, without the "
           f"built-in {card['served_tta']} TTA (one forward pass per image instead of "
           f"{num_views(card['served_tta'])}). " if NO_TTA_SIGNATURE in card.get("signatures", []) else "")
        + ("NaN, infinite or out-of-range pixels (a scaled or normalised image) are refused with `INVALID_ARGUMENT`, "
           "and an empty batch gets empty outputs. " if card.get("serving_checks") else "")
        + "fer_keras' tools (evaluate, predict, saliency, filters) use it when no `--model` is given, and the report "
        "when no `--model_dir` is given.",
        "",
        f"Written by `python -m fer_keras.model_card` on {card['date']}; the figures are in `{CARD_JSON}`.",
        "",
    ]
    return "\n".join(lines)


def write_card(run_dir: Path, export: Path, data: str | None, recipe: Path | None,
               tta_modes: Sequence[str] = TTA_MODES, init_recipe: Path | Sequence[Path] | None = None) -> Path:
    """Measures and writes the card files next to the export's versions; returns the README path."""
    from fer_keras.evaluate import plot_confusion, predictions_csv

    card, served = build_card(run_dir, export, data, recipe, tta_modes, init_recipe=init_recipe)
    base = Path(export)
    base = base.parent if (base / "saved_model.pb").is_file() else base
    plot_history(read_run(run_dir)[1], base / "history.png")  # drawn afresh: a run's own plot may be missing
    copies = [(Path(run_dir) / "flags.txt", TRAIN_FLAGS)]
    written = set()
    # build_card found each run's flags; they go to files beside the card, not into its JSON again.
    runs = [(init_flags_name(depth), record["run"])
            for depth, record in enumerate(start_chain(card["training"].get("init")), start=1)]
    for index, teacher in enumerate(card["training"].get("teachers") or [], start=1):
        run = teacher.get("run") if isinstance(teacher.get("run"), dict) else None
        runs.append((teacher_flags_name(index), run))
        runs += [(teacher_flags_name(index, depth), record["run"])
                 for depth, record in enumerate(start_chain(run and run.get("init")), start=1)]
    for name, run in runs:
        flags_text = run.pop("flags", None) if isinstance(run, dict) else None
        if flags_text is not None:
            atomic_write_text(base / name, flags_text)
            run["flags_file"] = name
            written.add(name)
    for stale in [*base.glob(f"init*_{TRAIN_FLAGS}"), *base.glob(f"teacher*_{TRAIN_FLAGS}")]:
        if stale.name not in written:
            stale.unlink()  # a previous card's
    for source, name in copies:
        atomic_write_text(base / name, source.read_bytes())
    plot_confusion(served.normalized_confusion, base / "confusion_matrix.png", normalized=True,
                   title=f"served export on {card['selection_split']}: accuracy {100 * served.accuracy:.1f} %")
    atomic_write_text(base / SERVED_PREDICTIONS, predictions_csv(served))
    atomic_write_text(base / CARD_JSON, json.dumps(card, indent=2) + "\n")
    atomic_write_text(base / CARD_MD, render_markdown(card))
    return base / CARD_MD


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "The training run directory the export came from.")
    flags.DEFINE_string("export", "saved_models/fer_resnet18",
                        "The export: NAME folder (highest version) or NAME/VERSION.")
    flags.DEFINE_string("data", "", "The data the run trained on (empty: the data its config.json records, else "
                        "the bundled sample); the card measures on the split that chose the run's epoch.")
    flags.DEFINE_string("recipe", "", "The flagfile the run was trained with; checked against the run.")
    flags.DEFINE_list("init_recipe", [], "For a run started with --init_from another run (or its export): the "
                      "flagfile that run was trained with, checked against it; for a chain of such runs, one "
                      "flagfile per run going back (the run it started from first).")
    flags.DEFINE_list("tta", list(TTA_MODES), "TTA modes to evaluate best.keras with.")
    flags.mark_flag_as_required("model_dir")
    flags.register_validator("tta", lambda v: bool(v) and set(v) <= set(TTA_MODES),
                             f"--tta must be a subset of {', '.join(TTA_MODES)}")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    path = write_card(Path(f.model_dir), Path(f.export), f.data or None, Path(f.recipe) if f.recipe else None, f.tta,
                      [Path(r) for r in f.init_recipe])
    more = "".join(f", {p.name}" for p in sorted([*path.parent.glob(f"init*_{TRAIN_FLAGS}"),
                                                  *path.parent.glob(f"teacher*_{TRAIN_FLAGS}")]))
    print(f"wrote {path} and {CARD_JSON}, {TRAIN_FLAGS}{more}, history.png, confusion_matrix.png, "
          f"{SERVED_PREDICTIONS} beside it")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
