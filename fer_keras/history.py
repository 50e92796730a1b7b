"""Per-epoch training history: ``history.csv`` and the report's ``history.png``, written atomically."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fer_keras.errors import ConfigError

if TYPE_CHECKING:
    from numpy.lib.npyio import NpzFile

# What reading a damaged or foreign .npz raises: cut short, empty or no zip archive, a bad CRC, an array missing.
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def atomic_write_text(path: Path, content: str | bytes) -> None:
    """Writes ``content`` (UTF-8 text or bytes) to a temporary file beside ``path``, syncs it and renames it
    into place, so a reader or a kill sees the old file or the new one, never half of one. Text that holds file
    names which are not UTF-8 (ids of image files) keeps their bytes as the file system has them."""
    path = Path(path)
    remove_dead_writers_tmp(path.parent, tag_prefix=f"{path.name}.")
    _remove_stale_legacy_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.", suffix=writer_id())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide configs and reports from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _existing_output(path: Path, limit: int = -1) -> bytes | None:
    """The first ``limit`` bytes (all: -1) of an output file that exists, None if there is none."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected an output file name")
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the existing file ({e.strerror or e})") from None


def is_version_name(name: str) -> bool:
    """Whether a folder name is a TF Serving version: ASCII digits only, as TF Serving parses them (``str.isdigit``
    takes ``²``, which ``int`` refuses, and ``isdecimal`` takes other scripts' digits, which TF Serving passes over)."""
    return name.isascii() and name.isdecimal()


def check_creatable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Refuses, before any long work, an output ``path`` (a file, or a ``folder``) that could not be written at the
    end: its nearest existing ancestor is a file or not writable, or the path is the wrong kind of thing (a file
    name ending in ``/``, which ``Path`` would drop, names a folder)."""
    given = os.fspath(path)
    path = Path(path)
    if not folder and given.endswith(("/", os.sep)) and not path.is_dir():
        raise ConfigError(f"{given}: ends in {given[-1]}, so it names a folder, expected an output file name; choose "
                          f"another {flag}")
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{path}: exists and is not a directory; choose another {flag}")
        if not folder and path.is_dir():
            raise ConfigError(f"{path}: is a directory, expected an output file name; choose another {flag}")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{path}: cannot be created, {ancestor} is a file; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot be created, {ancestor} is not writable; choose another {flag}")


def check_replaceable(path: str | os.PathLike, heads: Sequence[bytes], what: str, flag: str = "--output") -> None:
    """Refuses an output file that exists and does not begin like an earlier ``what`` (one of ``heads``): an
    ``--output`` that names the data, a model or a run's record by mistake must not destroy it."""
    path = Path(path)
    head = _existing_output(path, max(len(h) for h in heads))
    if head is not None and not any(head.startswith(h) for h in heads):
        raise ConfigError(f"{path}: exists and is not {what}; choose another {flag} or remove the file")


def check_json_replaceable(path: str | os.PathLike, keys: Sequence[str], what: str,
                           flag: str = "--output_dir") -> dict | None:
    """:func:`check_replaceable` for a JSON report whose first key varies: an existing file is replaced only if it
    is a JSON object holding all of ``keys``. Returns that earlier report (None if there is none)."""
    path = Path(path)
    raw = _existing_output(path)
    if raw is None:
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not (isinstance(document, dict) and set(keys) <= set(document)):
        raise ConfigError(f"{path}: exists and is not {what}; choose another {flag} or remove the file")
    return document


def open_npz(path: str | os.PathLike) -> NpzFile:
    """``np.load`` of an ``.npz`` archive, without pickles. A lone ``.npy`` array saved under the name loads as a
    plain array, which is no archive to read keys from: it raises ValueError, one of :data:`NPZ_ERRORS`, rather
    than the TypeError of using it as one."""
    import numpy as np

    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("a single NumPy array (.npy), not an .npz archive")
    return loaded


def check_npz_replaceable(path: str | os.PathLike, keys: Sequence[str], what: str, flag: str = "--output_dir") -> None:
    """:func:`check_json_replaceable` for a NumPy ``.npz`` output: an existing file is replaced only if it is an
    archive holding all of ``keys``."""
    path = Path(path)
    if _existing_output(path, 0) is None:
        return
    try:
        with open_npz(path) as existing:
            ours = set(keys) <= set(existing.files)
    except NPZ_ERRORS:
        ours = False
    if not ours:
        raise ConfigError(f"{path}: exists and is not {what}; choose another {flag} or remove the file")


def sha256_files(paths: Sequence[Path]) -> str:
    """One SHA-256 over the files' bytes in order: a model's identity however its path is spelled."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask, read from /proc where it can be: setting it to read it (the only portable way) changes
    it for every thread for a moment, and a file another thread creates meanwhile gets world-writable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


LEGACY_TMP_AGE = 3600.0


def _remove_stale_legacy_tmp(path: Path) -> None:
    """Deletes ``.NAME.tmp-RANDOM`` leftovers of ``path`` (the naming before session 13, which does not say who
    wrote them) once they are an hour old: such a write takes seconds, so its writer is gone. Best effort."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-[a-z0-9_]{{8}}({re.escape(path.suffix)})?")
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        try:
            if pattern.fullmatch(tmp.name) and tmp.is_file() and now - tmp.stat().st_mtime > LEGACY_TMP_AGE:
                tmp.unlink()
        except OSError:
            continue


def writer_id() -> str:
    """``-HOST-PID``: ends every temporary name, so a later writer can tell a dead writer's leftovers."""
    return f"-{socket.gethostname()}-{os.getpid()}"


def tmp_name(tag: str, suffix: str = "") -> str:
    """``.tmp-TAG-HOST-PID[SUFFIX]``: the hidden name a writer gives a file or folder until it is complete,
    so that a later writer can tell a dead writer's leftovers (:func:`remove_dead_writers_tmp`)."""
    return f".tmp-{tag}{writer_id()}{suffix}"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows: count every writer as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_writers_tmp(folder: Path, suffix: str = "", tag_prefix: str = "") -> list[Path]:
    """The :func:`tmp_name` leftovers in ``folder`` of writers on this host that are no longer alive; with
    ``tag_prefix`` only those whose tag is that prefix and ``mkstemp``'s 8-character random part, i.e. the
    temporaries of one target.

    Another host's (shared file system) or a live process's unfinished write is not among them.
    """
    # Exact tokens, so that a hyphenated host name ending in this host's name cannot pass for it: mkstemp's
    # random part after a target's prefix, else a tmp_name tag (they have no hyphen).
    tag = rf"{re.escape(tag_prefix)}[a-z0-9_]{{8}}" if tag_prefix else "[^-]+"
    pattern = re.compile(rf"\.tmp-{tag}-{re.escape(socket.gethostname())}-(\d+){re.escape(suffix)}")
    dead = []
    for tmp in sorted(Path(folder).glob(f".tmp-{glob.escape(tag_prefix)}*{suffix}")):
        match = pattern.fullmatch(tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            dead.append(tmp)
    return dead


def remove_dead_writers_tmp(folder: Path, suffix: str = "", tag_prefix: str = "") -> list[Path]:
    """Deletes :func:`dead_writers_tmp` from ``folder``. Best effort: what cannot be removed stays."""
    return [tmp for tmp in dead_writers_tmp(folder, suffix, tag_prefix) if remove_tmp(tmp)]


def remove_tmp(tmp: Path) -> bool:
    """Deletes a temporary file or folder; False when it cannot be (best effort: it then stays)."""
    try:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def fsync_path(path: Path) -> None:
    """Flushes a file's data, or a folder's entries, to disk (best effort): a rename then publishes complete
    contents even across a power loss, not only across a kill."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# "momentum" is blank for AdamW and in runs written before it was recorded (reading skips blank cells).
# val_raw_*: with weight averaging (train --average_from_epoch), the current weights' figures; val_* are the average's.
HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "momentum", "seconds",
                  "val_raw_loss", "val_raw_accuracy", "averaged_epochs")


def write_history_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def read_history_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a history.csv (blank cells left out); a :class:`DataError` naming the file, line and column for
    a cell that is not a number."""
    from fer_keras.errors import DataError

    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # decoded whole, so the line is the one holding the bad byte
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({e.reason})") from None
    rows = []
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                parsed = {}
                for key, value in row.items():
                    if value in (None, "") or key is None:
                        continue
                    try:
                        parsed[key] = int(value) if key in ("epoch", "averaged_epochs") else float(value)
                    except (TypeError, ValueError):
                        raise DataError(f"{path}: line {reader.line_num}: {key} {value!r} is not a number") from None
                if "epoch" not in parsed:
                    raise DataError(f"{path}: line {reader.line_num}: no epoch number")
                rows.append(parsed)
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: {e}") from None
    return rows


def read_run(run_dir: str | os.PathLike, needed: Sequence[str] = ("best.keras", "history.csv", "config.json"),
             ) -> tuple[dict, list[dict]]:
    """A training run's config.json and history.csv; one-line ConfigErrors for a folder that is not a run
    with a finished epoch, or whose files are unreadable."""
    from fer_keras.errors import ConfigError

    run_dir = Path(run_dir)
    for name in needed:
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: not a training run with a finished epoch (no {name})")
    config = read_config(run_dir)
    try:
        history = read_history_csv(run_dir / "history.csv")
    except OSError as e:
        raise ConfigError(f"{run_dir / 'history.csv'}: unreadable: {e}") from None
    if not history or any("epoch" not in row for row in history):
        raise ConfigError(f"{run_dir}/history.csv: no finished epoch")
    return config, history


def read_config(run_dir: str | os.PathLike) -> dict:
    """A run's ``config.json``; a one-line ConfigError naming it when it cannot be read or is not a JSON object
    (the tools would otherwise go on without the run's settings: its crop, its hold-out, its data options)."""
    import json

    from fer_keras.errors import ConfigError

    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def read_init(run_dir: str | os.PathLike) -> dict | None:
    """The ``init.json`` of a run started with ``--init_from`` (None for a run from random weights)."""
    import json

    from fer_keras.errors import ConfigError

    path = Path(run_dir) / "init.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable: {e}") from None
    if not isinstance(record, dict) or "path" not in record:
        raise ConfigError(f"{path}: expected the record of the model the run started from")
    return record


def unrecorded_start(config: dict | None) -> dict | None:
    """The stand-in for a run's missing or damaged ``init.json``: the weights its configuration says it started
    from (``{"path": init_from}``: how they were trained is not known), or None for a run from random weights."""
    init_from = config.get("init_from") if isinstance(config, dict) else None
    return {"path": init_from} if init_from else None


def read_data_record(run_dir: str | os.PathLike) -> dict | None:
    """A run's ``data.json`` (source; train and val image counts and fingerprints, val also its split name), or
    None when it is missing or damaged (a run older than it, a write cut short). Other read errors propagate."""
    import json

    try:
        record = json.loads((Path(run_dir) / "data.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):  # no run folder yet, no record, or a damaged one
        return None
    valid = isinstance(record, dict) and all(isinstance(record.get(k), dict) for k in ("train", "val"))
    return record if valid else None


def data_fingerprints(record) -> tuple[str, str] | None:
    """The (training, selection) image fingerprints a ``data.json`` record holds, or None when it holds none
    (a record older than them, a damaged one, or no record)."""
    try:
        train, val = record["train"]["sha256"], record["val"]["sha256"]
    except (KeyError, TypeError):
        return None
    return (train, val) if all(isinstance(f, str) and f for f in (train, val)) else None


def read_start(run_dir: str | os.PathLike | None, config: dict | None) -> dict | None:
    """What a run started from: its ``init.json``, or, when that is gone, unreadable or damaged,
    :func:`unrecorded_start` of its configuration (a chain of runs reads on past a damaged record)."""
    from fer_keras.errors import ConfigError

    try:
        init = read_init(run_dir) if run_dir else None
    except (ConfigError, OSError):
        init = None
    return init or unrecorded_start(config)


def best_row(history: list[dict]) -> dict:
    """The epoch with the highest validation accuracy (the earliest on ties), as best.keras holds it."""
    return max(history, key=lambda r: (r.get("val_accuracy", float("-inf")), -r["epoch"]))


def history_facts(history: list[dict]) -> dict:
    """What a run's history.csv says of it: its epochs, the best epoch (the one best.keras holds) and its validation
    accuracy, the last epoch's training accuracy, and the wall time of its epochs with their range (an epoch whose
    seconds cell is empty counts 0 s)."""
    best = best_row(history)
    seconds = [row.get("seconds", 0.0) for row in history]
    return {"epochs": len(history), "best_epoch": best["epoch"], "best_epoch_val_accuracy": best.get("val_accuracy"),
            "final_train_accuracy": history[-1].get("accuracy"), "wall_seconds": sum(seconds),
            "epoch_seconds": [min(seconds), max(seconds)]}


def run_record(run_dir: str | os.PathLike) -> dict | None:
    """A finished run's epochs, best epoch, wall time, configuration and flags, and the ``init.json`` of the run
    it started from in turn (so a chain of ``--init_from`` runs stays recorded); None if the folder is not a run."""
    from fer_keras.errors import FerError

    run_dir = Path(run_dir)
    try:
        config, history = read_run(run_dir)
    except FerError:  # not a run, or its record is damaged: the start is then unrecorded
        return None
    facts = history_facts(history)
    flags_file = run_dir / "flags.txt"
    init = read_start(run_dir, config)
    return {
        "model_dir": str(run_dir.resolve()),
        "epochs": facts["epochs"],
        "best_epoch": facts["best_epoch"],
        "best_val_accuracy": facts["best_epoch_val_accuracy"],
        "wall_seconds": facts["wall_seconds"],
        "config": config,
        "flags": read_flags_text(flags_file) if flags_file.is_file() else None,
        "init": init,
    }


def read_flags_text(path: Path) -> str:
    """A run's ``flags.txt``; a ConfigError naming it when it is not UTF-8 text (edited in another encoding)."""
    from fer_keras.errors import ConfigError

    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); it records the run's flags, "
                          "one --flag=value per line: save it as UTF-8") from None


def plot_history(history: list[dict], path: Path, title: str = "ResNet-18 on FER2013") -> None:
    """Accuracy on the left axis, loss on the right, train and validation per epoch."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    from fer_keras.vis import new_figure, save_figure

    epochs = [r["epoch"] for r in history]
    fig = new_figure(8, 5, dpi=100)
    ax_acc = fig.add_subplot()
    ax_loss = ax_acc.twinx()
    # Points marked while there are few: a line through one epoch draws nothing (history.png after epoch 1).
    style = {"marker": "o", "markersize": 3} if len(history) <= 30 else {}
    lines = []
    lines += ax_acc.plot(epochs, [100 * r["accuracy"] for r in history], "C0-", label="train accuracy", **style)
    lines += ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in history], "C1-", label="validation accuracy",
                         **style)
    raw = [r for r in history if "val_raw_accuracy" in r]
    if raw:  # weight averaging: val_accuracy is the average's from its first epoch on
        lines += ax_acc.plot([r["epoch"] for r in raw], [100 * r["val_raw_accuracy"] for r in raw], "C1:",
                             label="validation accuracy, weights before averaging", **style)
    lines += ax_loss.plot(epochs, [r["loss"] for r in history], "C0--", label="train loss", **style)
    lines += ax_loss.plot(epochs, [r["val_loss"] for r in history], "C1--", label="validation loss", **style)
    # Epochs are whole: no tick at epoch 1.25, nor at 0.96 around a single epoch.
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True) if len(set(epochs)) > 1 else FixedLocator(epochs))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_loss.set_ylabel("loss")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax_acc.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
