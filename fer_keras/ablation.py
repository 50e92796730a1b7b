"""Ablation table: training runs side by side, each measured now on the selection split.

    python -m fer_keras.ablation --runs=runs/base,runs/mixup --data=fer2013.csv.gz --output=ablation.md

For each run directory the table gives what its recipe changes relative to the first run (from the
runs' ``config.json``), epochs done, the best epoch, the wall time of its epochs (``history.csv``) and
the accuracy of its ``best.keras`` on the runs' selection split (FER2013 PublicTest, or the hold-out of
Training the runs chose their epochs on) without TTA, with flip and with ten-crop. All runs must share
that split, so the table compares like with like. Nothing is typed in: a run still training shows the
epochs it has. Evaluations are cached in each run directory (``ablation_eval.json``, keyed by
``best.keras``'s size and time and by the split's images and labels), so adding a run to the table only
measures that run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from absl import flags

from fer_keras import cli
from fer_keras.errors import ConfigError
from fer_keras.history import atomic_write_text, best_row, check_replaceable, read_run
from fer_keras.tta import TTA_MODES

if TYPE_CHECKING:
    from fer_keras.data import Split

EVAL_CACHE = "ablation_eval.json"
# Part of every cache key: measurements made another way are not reused (before "float32", a mixed-precision
# best.keras was evaluated in its training precision).
EVAL_METHOD = "float32"
# Settings that say where a run reads and writes, not how it learns.
NOT_RECIPE = frozenset({
    "data", "model_dir", "export", "export_dir", "export_name", "export_version", "export_tta", "verbose",
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
    stat = (run_dir / "best.keras").stat()
    fingerprint = fingerprint or split.fingerprint()
    keys = {mode: json.dumps([EVAL_METHOD, stat.st_size, stat.st_mtime_ns, fingerprint, mode]) for mode in tta_modes}
    missing = [mode for mode in tta_modes if keys[mode] not in cache]
    if missing:
        predictor = load_predictor(run_dir / "best.keras")
        for mode in missing:
            cache[keys[mode]] = evaluate(predictor, split, mode, batch_size, split_name=split_name).accuracy
        try:
            atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        except OSError:
            pass  # a read-only run directory is measured every time
    return {mode: cache[keys[mode]] for mode in tta_modes}


def build_table(run_dirs: Sequence[Path], data: str | None, tta_modes: Sequence[str] = TTA_MODES,
                batch_size: int = 256) -> list[AblationRow]:
    """One measured row per run; the first run is the baseline the others' changes are stated against.

    ``data`` None measures each run on the data it recorded. Runs selected on different splits (other
    data, or another hold-out seed or fraction) are refused: their accuracies would not compare.
    """
    from fer_keras.export import selection_split

    if not run_dirs:
        raise ConfigError("no runs given (--runs=DIR,DIR,...)")
    runs = [(Path(d), *read_run(Path(d))) for d in run_dirs]
    # Whole splits: a run that selected on a --max_val_examples subset is measured on all of it, like the rest.
    splits = [selection_split(data, {**config, "max_val_examples": 0}) for _, config, _ in runs]
    first_split, first_name, first_source = splits[0]
    first_print = first_split.fingerprint()
    for (run_dir, _, _), (split, name, source) in zip(runs[1:], splits[1:]):
        if split.fingerprint() != first_print:
            raise ConfigError(
                f"{run_dir}: selected on {name} ({len(split):,} images of {source}), not on {runs[0][0].name}'s "
                f"{first_name} ({len(first_split):,} images of {first_source}); an ablation compares runs on one "
                "split (give --data, or compare runs of the same data and hold-out)"
            )
    label = "val (PublicTest)" if first_name == "PublicTest" else f"val ({first_name})"
    baseline = runs[0][1]
    rows = []
    for run_dir, config, history in runs:
        best = best_row(history)
        rows.append(AblationRow(
            run=run_dir.name,
            changes=recipe_changes(config, baseline),
            epochs_done=len(history),
            epochs_planned=int(config.get("epochs", len(history))),
            best_epoch=best["epoch"],
            wall_seconds=sum(r.get("seconds", 0.0) for r in history),
            split_label=label,
            num_images=len(first_split),
            accuracy=measure_accuracy(run_dir, first_split, "val", tta_modes, batch_size, first_print),
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
    lines.append(f"Accuracy of each run's best.keras on {split}, {rows[0].num_images:,} images, the split that also "
                 "picked its best epoch; wall time is the sum of its epochs' times in history.csv.")
    return "\n".join(lines) + "\n"


def check_outputs(path: Path) -> None:
    """Refuses ``path`` (the table) or the .json beside it if either exists and is not an earlier ablation's."""
    check_replaceable(path, (("| " + " | ".join(TABLE_COLUMNS) + " |").encode(),), "an ablation table")
    check_replaceable(path.with_suffix(".json"), (b'[\n  {\n    "run": ',), "an ablation's figures")


def define_flags() -> None:
    flags.DEFINE_list("runs", None, "Training run directories, comma-separated; the first is the baseline.")
    flags.DEFINE_string("data", "", "The data to measure the runs on (empty: the data each run recorded, else "
                        "the bundled sample); its PublicTest, or the runs' hold-out of Training, is measured.")
    flags.DEFINE_list("tta", list(TTA_MODES), "TTA modes to measure each run's best.keras with.")
    flags.DEFINE_string("output", "", "Also write the Markdown table here, a .md file (and the figures as .json "
                        "beside it); an existing file is replaced only if it is an earlier table.")
    flags.DEFINE_integer("batch_size", 256, "Images per model call.")
    flags.mark_flag_as_required("runs")
    flags.register_validator("tta", lambda v: bool(v) and set(v) <= set(TTA_MODES),
                             f"--tta must be a subset of {', '.join(TTA_MODES)}")
    flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1")
    flags.register_validator("output", lambda v: not v or v.endswith(".md"), "--output must end with .md")


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
