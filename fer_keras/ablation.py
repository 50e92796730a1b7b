"""Ablation table: training runs side by side, each measured now on the selection split.

    python -m fer_keras.ablation --runs=runs/base,runs/mixup --data=fer2013.csv.gz --output=ablation.md

For each run directory the table gives what its recipe changes relative to the first run (from the
runs' ``config.json``), epochs done, the best epoch, the wall time of its epochs (``history.csv``) and
the accuracy of its ``best.keras`` on the runs' selection split (FER2013 PublicTest, or the hold-out of
Training the runs chose their epochs on) without TTA, with flip and with ten-crop. All runs must share
that split, and the data must give every run the training and selection images its ``data.json`` records
(a run trained on other data, or measured on data it was not trained on, is refused), so the table compares
like with like and its footer states the split the runs record. Nothing is typed in: a run still training
shows the epochs it has. Evaluations are cached in each run directory (``ablation_eval.json``, keyed by
``best.keras``'s size and time and by the split's images and labels), so adding a run to the table only
measures that run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from absl import flags, logging

from fer_keras import cli
from fer_keras.errors import ConfigError
from fer_keras.history import (
    atomic_write_text,
    check_replaceable,
    data_fingerprints,
    history_facts,
    read_data_record,
    read_run,
)
from fer_keras.tta import TTA_MODES

if TYPE_CHECKING:
    from fer_keras.data import FerData, Split

EVAL_CACHE = "ablation_eval.json"
# Part of every cache key: measurements made another way are not reused (before "float32", a mixed-precision
# best.keras was evaluated in its training precision).
EVAL_METHOD = "float32"
# Settings that say where a run reads and writes, not how it learns.
NOT_RECIPE = frozenset({
    "data", "model_dir", "export", "export_dir", "export_name", "export_version", "export_tta", "export_crop_size",
    "verbose",
    "use_cache", "skip_bad_rows", "collective_timeout", "tpu_address",
})

TABLE_COLUMNS = ("run", "differs from the first run", "epochs", "best epoch", "wall time")


@dataclasses.dataclass
class AblationRow:
    run: str
    changes: list[str]
    epochs_done: int
    epochs_planned: int
    best_epoch: int
    wall_seconds: float
    split_label: str
    num_images: int
    accuracy: dict[str, float]
    # Images of the split the run's data.json says it chose its best epoch on (fewer than num_images after
    # --max_val_examples); None: no data.json, so neither its data nor that split could be checked.
    selected_on: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def recipe_changes(config: dict, baseline: dict) -> list[str]:
    """``name=value`` for every recipe setting where ``config`` differs from ``baseline``.

    A setting missing from a run's config.json (made before the setting existed) has its default value.
    """
    from fer_keras.train import TrainConfig

    config, baseline = TrainConfig.recorded(config), TrainConfig.recorded(baseline)
    keys = sorted((set(config) | set(baseline)) - NOT_RECIPE)
    return [f"{k}={config.get(k, '(unset)')}" for k in keys if config.get(k) != baseline.get(k)]


def _is_accuracy(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def measure_accuracy(run_dir: Path, split: Split, split_name: str, tta_modes: Sequence[str],
                     batch_size: int = 256, fingerprint: str | None = None) -> dict[str, float]:
    """Accuracy of the run's best.keras per TTA mode, from the cache when best.keras and the split are unchanged."""
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import load_predictor

    cache_path = run_dir / EVAL_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):  # damaged or hand-edited: measured again and rewritten
        cache = {}
    stat = (run_dir / "best.keras").stat()
    fingerprint = fingerprint or split.fingerprint()
    keys = {mode: json.dumps([EVAL_METHOD, stat.st_size, stat.st_mtime_ns, fingerprint, mode]) for mode in tta_modes}
    missing = [mode for mode in tta_modes if not _is_accuracy(cache.get(keys[mode]))]
    if missing:
        predictor = load_predictor(run_dir / "best.keras")
        for mode in missing:
            cache[keys[mode]] = evaluate(predictor, split, mode, batch_size, split_name=split_name).accuracy
        try:
            atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        except OSError:
            pass  # a read-only run directory is measured every time
    return {mode: cache[keys[mode]] for mode in tta_modes}


def recorded_selection(run_dir: Path, dataset: FerData, train: Split, val: Split, name: str,
                       hint: str) -> tuple[str, int] | None:
    """The selection split a run's ``data.json`` records: its name and how many images chose the best epoch.

    Refuses ``dataset`` when the run's own splits of it (``train`` and ``val``, under the run's seed, hold-out and
    example limits) are not the training and selection images the record fingerprints: a row measured on other
    data, or of a run trained on other data than the rest, would not compare. None when the run records none
    (older than data.json, or a damaged one): then nothing can be checked.
    """
    path = run_dir / "data.json"
    try:
        record = read_data_record(run_dir)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    fingerprints = data_fingerprints(record)
    if fingerprints is None:
        return None
    differs = [what for what, split, recorded in zip(("training", "selection"), (train, val), fingerprints)
               if split.fingerprint() != recorded]
    recorded_name = record["val"].get("name") if isinstance(record["val"].get("name"), str) else name
    if differs:
        def count(part: dict) -> str:
            return f"{part['images']:,}" if isinstance(part.get("images"), int) else "?"

        raise ConfigError(
            f"{run_dir}: {dataset.source} does not give it the {' and '.join(differs)} images its data.json records "
            f"({count(record['train'])} training and {count(record['val'])} {recorded_name} images of "
            f"{record.get('source')}; {dataset.source} gives {len(train):,} and {len(val):,} {name}); {hint}"
        )
    return recorded_name, len(val)


def build_table(run_dirs: Sequence[Path], data: str | None, tta_modes: Sequence[str] = TTA_MODES,
                batch_size: int = 256) -> list[AblationRow]:
    """One measured row per run; the first run is the baseline the others' changes are stated against.

    ``data`` None measures the runs on the data the first run recorded (the bundled sample if none). Runs
    selected on different splits of it (another hold-out seed or fraction), or whose ``data.json`` records other
    training or selection images than it gives them, are refused: their accuracies would not compare.
    """
    from fer_keras import data as fer_data
    from fer_keras.train import TrainConfig, run_splits_of, selection_subset_of

    if not run_dirs:
        raise ConfigError("no runs given (--runs=DIR,DIR,...)")
    runs = [(Path(d), *read_run(Path(d))) for d in run_dirs]
    first = TrainConfig.recorded(runs[0][1])
    # One data set for all: per-run data would let runs trained on different images share a table.
    dataset = fer_data.load(data or first["data"] or None, skip_bad_rows=bool(first["skip_bad_rows"]),
                            use_cache=bool(first["use_cache"]))
    # Whole selection splits: a run that selected on a --max_val_examples subset is measured on all of it, like
    # the rest; the subset is cut from it only to check the run's data.json.
    splits = [run_splits_of(dataset, {**config, "max_val_examples": 0}) for _, config, _ in runs]
    _, first_split, first_name = splits[0]
    first_print = first_split.fingerprint()
    for (run_dir, _, _), (_, split, name) in zip(runs[1:], splits[1:]):
        if split.fingerprint() != first_print:
            raise ConfigError(
                f"{run_dir}: selected on {name} ({len(split):,} images of {dataset.source}), not on "
                f"{runs[0][0].name}'s {first_name} ({len(first_split):,} images); an ablation compares runs on one "
                "split (give --data, or compare runs of the same data and hold-out)"
            )
    hint = ("give --data the data the runs were trained on" if data else
            f"one table's runs must be trained on one data set, here {runs[0][0].name}'s (give --data the data they "
            "were trained on)")
    recorded = [recorded_selection(run_dir, dataset, train, selection_subset_of(val, config), name, hint)
                for (run_dir, config, _), (train, val, name) in zip(runs, splits)]
    for (run_dir, _, _), record in zip(runs, recorded):
        if record is None:
            logging.warning("%s: no usable data.json, so the data it was trained and selected on is not checked",
                            run_dir)
    label = f"val ({next((r[0] for r in recorded if r), first_name)})"
    baseline = runs[0][1]
    rows = []
    for (run_dir, config, history), record in zip(runs, recorded):
        facts = history_facts(history)
        rows.append(AblationRow(
            run=run_dir.name,
            changes=recipe_changes(config, baseline),
            epochs_done=facts["epochs"],
            epochs_planned=int(config.get("epochs", len(history))),
            best_epoch=facts["best_epoch"],
            wall_seconds=facts["wall_seconds"],
            split_label=label,
            num_images=len(first_split),
            accuracy=measure_accuracy(run_dir, first_split, "val", tta_modes, batch_size, first_print),
            selected_on=record[1] if record else None,
        ))
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def render_markdown(rows: Sequence[AblationRow]) -> str:
    modes = list(rows[0].accuracy)
    split = rows[0].split_label
    head = list(TABLE_COLUMNS) + [f"{split} {'no TTA' if m == 'none' else m}" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    for r in rows:
        epochs = f"{r.epochs_done}" if r.epochs_done >= r.epochs_planned else f"{r.epochs_done} of {r.epochs_planned}"
        cells = [f"`{r.run}`", ", ".join(f"`{c}`" for c in r.changes) or "(baseline)", epochs, str(r.best_epoch),
                 _minutes(r.wall_seconds)] + [f"{100 * r.accuracy[m]:.1f} %" for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Accuracy of each run's best.keras on {split}, {rows[0].num_images:,} images{selection_note(rows)}; "
                 "wall time is the sum of its epochs' times in history.csv.")
    return "\n".join(lines) + "\n"


def _names(rows: Sequence[AblationRow]) -> str:
    names = [f"`{r.run}`" for r in rows]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def selection_note(rows: Sequence[AblationRow]) -> str:
    """The footer's claim about the split that picked each run's best epoch, as the runs' data.json record it."""
    if all(r.selected_on == r.num_images for r in rows):
        return ", the split that also picked each run's best epoch (as its data.json records)"
    clauses = []
    for count in dict.fromkeys(r.selected_on for r in rows if r.selected_on is not None):  # in the runs' order
        where = "all of them" if count == rows[0].num_images else f"{count:,} of them (--max_val_examples)"
        verb = "" if clauses else "picked the best epoch "
        clauses.append(f"{_names([r for r in rows if r.selected_on == count])} {verb}on {where}")
    unknown = [r for r in rows if r.selected_on is None]
    note = "; by their data.json, " + ", ".join(clauses) if clauses else ""
    if unknown:
        note += (f"; {_names(unknown)} {'has' if len(unknown) == 1 else 'have'} no usable data.json, so neither the "
                 "data nor the split that picked the best epoch is known")
    return note


def check_outputs(path: Path) -> None:
    """Refuses ``path`` (the table) or the .json beside it if either exists and is not an earlier ablation's."""
    check_replaceable(path, (("| " + " | ".join(TABLE_COLUMNS) + " |").encode(),), "an ablation table")
    check_replaceable(path.with_suffix(".json"), (b'[\n  {\n    "run": ',), "an ablation's figures")


def define_flags() -> None:
    flags.DEFINE_list("runs", None, "Training run directories, comma-separated; the first is the baseline.")
    flags.DEFINE_string("data", "", "The data to measure the runs on (empty: the data the first run recorded, else "
                        "the bundled sample); its PublicTest, or the runs' hold-out of Training, is measured. It "
                        "must give every run the training and selection images its data.json records.")
    flags.DEFINE_list("tta", list(TTA_MODES), "TTA modes to measure each run's best.keras with.")
    flags.DEFINE_string("output", "", "Also write the Markdown table here, a .md file (and the figures as .json "
                        "beside it); an existing file is replaced only if it is an earlier table.")
    flags.DEFINE_integer("batch_size", 256, "Images per model call.")
    flags.mark_flag_as_required("runs")
    flags.register_validator("tta", lambda v: bool(v) and set(v) <= set(TTA_MODES),
                             f"--tta must be a subset of {', '.join(TTA_MODES)}")
    flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1")
    flags.register_validator("output", lambda v: not v or v.endswith(".md"), "--output must end with .md")
    flags.register_validator("runs", lambda v: v is None or all(s.strip() for s in v),
                             "--runs has an empty entry (a stray comma?)")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    out = Path(f.output) if f.output else None
    if out is not None:  # before minutes of evaluation, not after
        check_outputs(out)
        out.parent.mkdir(parents=True, exist_ok=True)
    rows = build_table([Path(r) for r in f.runs], f.data or None, f.tta, f.batch_size)
    table = render_markdown(rows)
    if out is not None:
        atomic_write_text(out, table)
        atomic_write_text(out.with_suffix(".json"), json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    sys.stdout.write(table)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
