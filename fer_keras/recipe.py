"""Recipe chains: a run that starts from, or distils from, the models that other recipes train.

``--init_from`` and ``--teachers`` take a model, or a recipe's flagfile (``flags/NAME.cfg``): "the model that recipe
trains". Such a recipe is a *stage* of the run. Its run folder is ``NAME`` beside the run's ``--model_dir``, and it is
trained first, in a process of its own, by ``python -m fer_keras.train --flagfile=flags/NAME.cfg --model_dir=...
--noexport`` with the run's data and hardware flags (:data:`INHERITED`). Stages of stages come before it. A finished
stage is not trained again; an unfinished one resumes. So one command trains a whole chain, such as the shipped
model's (``flags/fer2013.cfg``), and the same command after an interruption carries on where it stopped.

A separate process per stage, because a process keeps what TensorFlow took (GPU memory, logical CPU devices, the
dtype policy) and a stage should start as a user's own run would.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fer_keras.errors import ConfigError, FerError

if TYPE_CHECKING:  # train imports this module when it runs
    from fer_keras.train import TrainConfig

# How a stage runs, not what it trains: the run's own values apply to its stages.
INHERITED = ("data", "skip_bad_rows", "use_cache", "strategy", "cpu_devices", "num_gpus", "tpu_address",
             "collective_timeout", "deterministic", "verbose")
SUFFIX = ".cfg"


def is_recipe(reference: str) -> bool:
    """Whether an ``--init_from`` or ``--teachers`` entry names a recipe (a flagfile) rather than a model."""
    return reference.endswith(SUFFIX)


def stage_dir(recipe: str, config: TrainConfig) -> Path:
    """The folder of ``recipe``'s run as a stage of ``config``'s run: its name beside ``config.model_dir``."""
    return Path(config.model_dir).parent / Path(recipe).name.removesuffix(SUFFIX)


def references(config: TrainConfig) -> list[str]:
    """The recipes ``config`` starts or distils from, init_from first."""
    return [r for r in (config.init_from, *config.teachers) if r and is_recipe(r)]


@dataclasses.dataclass
class Stage:
    """A recipe's run: its flagfile as named, its folder, its settings and the epochs its checkpoints hold."""

    recipe: str
    model_dir: Path
    config: TrainConfig
    args: list[str]
    done_epochs: int

    @property
    def finished(self) -> bool:
        return self.done_epochs >= self.config.epochs and (self.model_dir / "best.keras").is_file()

    def state(self) -> str:
        if self.finished:
            return "done"
        if self.done_epochs:
            return f"resumes after epoch {self.done_epochs} of {self.config.epochs}"
        return f"new, {self.config.epochs} epochs"


def inherited_args(config: TrainConfig) -> list[str]:
    """``config``'s :data:`INHERITED` settings as command-line flags."""
    from fer_keras.train import flag_args

    return flag_args({name: getattr(config, name) for name in INHERITED})


def read_stage(recipe: str, config: TrainConfig) -> Stage:
    """The stage that trains ``recipe`` for ``config``'s run, with its :data:`INHERITED` settings. Its
    checkpoints, when it has any, must be of the recipe's present settings."""
    from fer_keras import checkpoint, train

    if not Path(recipe).is_file():
        raise ConfigError(f"{recipe}: no such recipe flagfile (--init_from and --teachers take a model, or the "
                          f"flagfile of the recipe that trains it)")
    model_dir = stage_dir(recipe, config)
    args = [f"--flagfile={recipe}", f"--model_dir={model_dir}", "--noexport", *inherited_args(config)]
    try:
        stage_config = train.config_from_args(args)
    except ConfigError as e:
        raise ConfigError(f"recipe {recipe}: {e}") from None
    latest = checkpoint.latest_checkpoint(model_dir / "checkpoints")
    if latest is not None:
        train.check_resumable(model_dir, stage_config, latest,
                              advice=f"move it away to train the stage again with {recipe} as it is now")
    return Stage(recipe, model_dir, stage_config, args, latest[1]["epoch"] if latest else 0)


def plan(config: TrainConfig) -> list[Stage]:
    """The stages ``config`` needs, each after the stages it needs itself (a recipe named twice is one stage).
    A cycle, a missing or invalid recipe, and two recipes that would share a folder are refused."""
    own = Path(os.path.abspath(config.model_dir))
    stages: dict[str, Stage] = {}
    folders: dict[Path, str] = {}

    def visit(run_config: TrainConfig, chain: tuple[str, ...]) -> None:
        for recipe in references(run_config):
            key = os.path.abspath(recipe)
            if key in chain:
                names = [os.path.relpath(k) for k in (*chain[chain.index(key):], key)]
                raise ConfigError(f"recipe cycle: {' -> '.join(names)}")
            if key in stages:
                continue
            stage = read_stage(recipe, config)
            folder = Path(os.path.abspath(stage.model_dir))
            if folder == own:
                raise ConfigError(f"recipe {recipe} would train into this run's own folder {config.model_dir}; "
                                  "use another --model_dir")
            if folders.get(folder, key) != key:
                raise ConfigError(f"recipes {os.path.relpath(folders[folder])} and {recipe} would both train into "
                                  f"{stage.model_dir}; rename one")
            folders[folder] = key
            visit(stage.config, (*chain, key))
            stages[key] = stage

    visit(config, ())
    return list(stages.values())


def locate(config: TrainConfig) -> tuple[str, tuple[str, ...]]:
    """``config``'s init_from and teachers with each recipe replaced by its stage's folder."""

    def where(reference: str) -> str:
        return str(stage_dir(reference, config)) if reference and is_recipe(reference) else reference

    return where(config.init_from), tuple(where(t) for t in config.teachers)


def describe(config: TrainConfig, stages: list[Stage], resumes_after: int) -> str:
    """The plan as ``--dry_run`` prints it; ``resumes_after``: the epochs ``config``'s run has finished (a run that
    has started trains no stage, so ``stages`` is then empty)."""
    lines = []
    if resumes_after:
        lines.append(f"{config.model_dir} has started, so it trains no recipe stage: it resumes from its own "
                     "checkpoint with the teachers' probabilities it keeps")
    elif stages:
        lines.append(f"{len(stages)} recipe stage(s) before {config.model_dir}, in order, each trained by python -m "
                     "fer_keras.train --flagfile=RECIPE --model_dir=FOLDER --noexport with this run's "
                     f"{', '.join('--' + name for name in INHERITED)}:")
        lines += [f"  {i}. {s.recipe} -> {s.model_dir}: {s.state()}" for i, s in enumerate(stages, 1)]
    else:
        lines.append(f"no recipe stages: {config.model_dir} starts from "
                     f"{config.init_from or 'random weights'}" + (" with teachers" if config.teachers else ""))
    state = f"resumes after epoch {resumes_after} of" if resumes_after else "new,"
    lines.append(f"then {config.model_dir}: {state} {config.epochs} epochs")
    return "\n".join(lines)


def train_stages(config: TrainConfig, stages: list[Stage]) -> None:
    """Trains each unfinished stage in order, each in its own ``python -m fer_keras.train`` process whose output
    is this one's. A stage that fails stops the chain with what is kept; the same command resumes it."""
    pending = [s for s in stages if not s.finished]
    if pending and config.strategy == "multi_worker":
        raise ConfigError(f"--strategy=multi_worker trains no recipe stages (every worker would start them): train "
                          f"{pending[0].recipe} first, e.g. python -m fer_keras.train {' '.join(pending[0].args)}")
    for i, stage in enumerate(stages, 1):
        print(f"recipe stage {i}/{len(stages)} {stage.recipe} ({stage.model_dir}): {stage.state()}", flush=True)
        if stage.finished:
            continue
        sys.stderr.flush()
        code = subprocess.call([sys.executable, "-m", "fer_keras.train", *stage.args])
        if code:
            raise FerError(f"recipe stage {stage.recipe} ({stage.model_dir}) stopped with exit code {code} (its "
                           "output is above); the same command resumes it")
        stage.done_epochs = read_stage(stage.recipe, config).done_epochs
        if not stage.finished:
            raise FerError(f"recipe stage {stage.recipe} ended without finishing its {stage.config.epochs} epochs and "
                           f"a best.keras in {stage.model_dir}")
