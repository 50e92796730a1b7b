"""SIGKILL while checkpoints and exports are being written never leaves a half-written one in place."""

from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import cli_env

WRITER = textwrap.dedent("""
    import sys, keras, numpy as np
    from pathlib import Path
    from fer_keras import checkpoint, export
    from fer_keras.model import resnet18
    target, what = Path(sys.argv[1]), sys.argv[2]
    model = resnet18("imagenet")
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    model.optimizer.build(model.trainable_variables)
    # An export traces the model first and writes after: "writing" marks the start of the disk writes. On the
    # TensorFlow backend ExportArchive() makes a backend class's archive, whose write_out this wraps.
    archive_class = type(keras.export.ExportArchive())
    write_out = archive_class.write_out

    def announced_write_out(self, *args, **kwargs):
        print("writing", flush=True)
        return write_out(self, *args, **kwargs)

    archive_class.write_out = announced_write_out
    print("ready", flush=True)
    for epoch in range(1, 10_000):
        if what == "checkpoint":
            print("writing", flush=True)
            checkpoint.write_checkpoint(model, target, {"epoch": epoch, "history": [], "best_epoch": epoch,
                                                        "best_val_accuracy": 0.5})
        else:
            export.export_model(model, target, "m")
        print("wrote", flush=True)
""")


def kill_repeatedly(tmp_path: Path, what: str, target: Path, rounds: int) -> int:
    """Kills a writer in the middle of its disk writes: the first round times one complete write (from its hidden
    temporary appearing to its rename), and every round kills the next write at a random moment within that time
    after its temporary appeared. Returns how many rounds left a new hidden temporary behind, so a test can show
    the kills landed mid-write."""
    rng = random.Random(7)
    duration = None
    interrupted = 0
    for round_ in range(rounds):
        before = set(target.rglob(".tmp-*"))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), what], env=cli_env(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 300

        def expect(word: str) -> None:
            got = lines.get(timeout=max(deadline - time.monotonic(), 0.1))  # queue.Empty fails the test, no hang
            assert got == word, got

        def temporary_appears() -> float:
            """Waits for this write's hidden temporary (an export's appears only after tracing); its time."""
            while not set(target.rglob(".tmp-*")) - before:
                assert time.monotonic() < deadline and proc.poll() is None, "no temporary appeared"
                time.sleep(0.005)
            return time.monotonic()

        try:
            expect("ready")
            expect("writing")
            if duration is None:
                appeared = temporary_appears()
                expect("wrote")
                duration = time.monotonic() - appeared
                expect("writing")
                before = set(target.rglob(".tmp-*"))
            temporary_appears()
            time.sleep(rng.uniform(0.0, 0.9 * duration))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=60)
        interrupted += bool(set(target.rglob(".tmp-*")) - before)
    return interrupted


@pytest.mark.slow
def test_killed_checkpoint_writes_leave_only_complete_checkpoints(tmp_path):
    from fer_keras import checkpoint

    target = tmp_path / "checkpoints"
    assert kill_repeatedly(tmp_path, "checkpoint", target, rounds=4) >= 1
    final = sorted(target.glob("epoch_*"))
    assert final
    for folder in final:
        assert json.loads((folder / "state.json").read_text())["epoch"] == int(folder.name.split("_")[1])
        assert (folder / "model.weights.h5").stat().st_size > 40_000_000
    latest = checkpoint.latest_checkpoint(target)
    assert latest is not None and latest[0] == final[-1]
    import h5py

    with h5py.File(latest[0] / "model.weights.h5", "r") as f:  # readable to the end
        assert "optimizer" in f and "layers" in f


@pytest.mark.slow
def test_killed_exports_leave_only_complete_versions(tmp_path):
    target = tmp_path / "exports"
    assert kill_repeatedly(tmp_path, "export", target, rounds=4) >= 1
    versions = sorted((p for p in (target / "m").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert versions
    assert [int(p.name) for p in versions] == list(range(1, len(versions) + 1))
    for version in versions:
        for needed in ("saved_model.pb", "variables/variables.index", "assets.extra/fer_keras.json"):
            assert (version / needed).is_file(), (version, needed)
    import tensorflow as tf

    tf.saved_model.load(str(versions[-1])).signatures["serving_default"]
    # Interrupted writes stay hidden (TF Serving only serves integer folders).
    assert all(p.name.startswith(".tmp-") for p in (target / "m").iterdir() if not p.name.isdigit())
    # The next export on this host removes the leftovers of killed ones.
    from fer_keras.history import remove_dead_writers_tmp

    remove_dead_writers_tmp(target / "m")
    assert sorted(p.name for p in (target / "m").iterdir()) == sorted(p.name for p in versions)


def test_a_kill_while_pruning_old_checkpoints_leaves_no_half_deleted_epoch(tmp_path, monkeypatch):
    """Pruning deletes the oldest checkpoint folder file by file; a writer killed halfway must not leave an
    ``epoch_*`` folder that looks like a checkpoint but is not one."""
    import keras

    from fer_keras import checkpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    target = tmp_path / "checkpoints"
    for epoch in range(1, checkpoint.CHECKPOINTS_KEPT + 1):
        checkpoint.write_checkpoint(model, target, {"epoch": epoch, "history": [], "best_epoch": epoch,
                                                    "best_val_accuracy": 0.5})

    real_rmtree = checkpoint.shutil.rmtree

    def killed_halfway(path, ignore_errors=False):
        if "epoch_0001" not in Path(path).name:
            return real_rmtree(path, ignore_errors=ignore_errors)
        next(Path(path).iterdir()).unlink()  # one file of the oldest checkpoint gone, then the process dies
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_halfway)
    with pytest.raises(SystemExit):
        checkpoint.write_checkpoint(model, target, {"epoch": checkpoint.CHECKPOINTS_KEPT + 1, "history": [],
                                                    "best_epoch": 1, "best_val_accuracy": 0.5})
    for folder in target.glob("epoch_*"):
        assert (folder / "state.json").is_file() and (folder / "model.weights.h5").is_file(), folder


def test_what_a_user_keeps_beside_the_checkpoints_is_neither_pruned_nor_resumed_from(tmp_path):
    """A copy (``epoch_0001.keep``) or an archive (``epoch_0001.tar``) in checkpoints/ is the user's: pruning keeps
    it, and a resume does not take it for an epoch."""
    import shutil
    import tarfile

    import keras

    from fer_keras import checkpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    target = tmp_path / "checkpoints"

    def write(epoch):
        return checkpoint.write_checkpoint(model, target, {"epoch": epoch, "history": [], "best_epoch": epoch,
                                                           "best_val_accuracy": 0.5})

    first = write(1)
    shutil.copytree(first, target / "epoch_0001.keep")
    shutil.copytree(first, target / "epoch_9999_old")
    with tarfile.open(target / "epoch_0001.tar", "w") as t:
        t.add(first, first.name)
    for epoch in range(2, checkpoint.CHECKPOINTS_KEPT + 3):
        write(epoch)
    kept = [f"epoch_{e:04d}" for e in range(3, checkpoint.CHECKPOINTS_KEPT + 3)]
    assert sorted(p.name for p in target.iterdir()) == sorted(kept + ["epoch_0001.keep", "epoch_0001.tar",
                                                                      "epoch_9999_old"])
    assert [p.name for p in checkpoint.epoch_folders(target)] == kept
    assert checkpoint.latest_checkpoint(target)[0].name == kept[-1]


def test_latest_checkpoint_skips_damaged_states_and_stops_on_unreadable_ones(tmp_path, monkeypatch, caplog):
    """A resume reads a checkpoint's state blind: a damaged one is skipped by name (the epoch before is used), one
    that cannot be read at all is a one-line error, not a silent resume from an older epoch."""
    from fer_keras import checkpoint
    from fer_keras.errors import ConfigError

    def make(epoch: int, state) -> Path:
        folder = tmp_path / f"epoch_{epoch:04d}"
        folder.mkdir()
        (folder / "model.weights.h5").write_bytes(b"w")
        (folder / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))
        return folder

    good = {"epoch": 1, "history": [{"epoch": 1}], "best_epoch": 1, "best_val_accuracy": 0.5}
    first = make(1, good)
    make(2, {**good, "epoch": 7})  # a copy of another epoch's state
    make(3, ["not", "a", "state"])
    make(4, '{"epoch": 4, "hist')  # cut
    make(5, {**good, "epoch": 5, "history": None})
    (tmp_path / "epoch_0009.tar.gz").write_bytes(b"an archive, not a checkpoint")
    with caplog.at_level("WARNING"):
        assert checkpoint.latest_checkpoint(tmp_path) == (first, good)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for epoch, problem in [(2, "its epoch 7 is not the folder's"), (3, "not a JSON object"),
                           (4, "unreadable state.json (JSONDecodeError)"), (5, "no history list")]:
        assert f"epoch_{epoch:04d}: skipped, {problem}" in messages

    read_text = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self.parent.name == "epoch_0005":
            raise PermissionError(13, "Permission denied")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(ConfigError, match=r"epoch_0005/state.json: cannot be read \(Permission denied\)"):
        checkpoint.latest_checkpoint(tmp_path)


def test_a_checkpoint_whose_files_changed_since_written_is_skipped_by_name(tmp_path, caplog):
    """state.json records each file's size and SHA-256: a weights file cut short or altered in place (a copy gone
    wrong keeps its name) sends the resume to the epoch before, with a warning that says which file and how."""
    import keras

    from fer_keras import checkpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    target = tmp_path / "checkpoints"

    def write(epoch):
        return checkpoint.write_checkpoint(
            model, target, {"epoch": epoch, "history": [], "best_epoch": epoch, "best_val_accuracy": 0.5},
            extra=lambda folder: (folder / "average.npz").write_bytes(b"average"))

    first, second = write(1), write(2)
    recorded = json.loads((second / "state.json").read_text())["files"]
    weights = second / "model.weights.h5"
    assert sorted(recorded) == ["average.npz", "model.weights.h5"]
    assert recorded["model.weights.h5"]["bytes"] == weights.stat().st_size
    assert checkpoint.latest_checkpoint(target)[0] == second
    data = weights.read_bytes()
    for damaged, problem in [
        (data[: len(data) // 2], f"model.weights.h5 is {len(data) // 2:,} bytes, {len(data):,} when written"),
        (data[:-1] + bytes([data[-1] ^ 1]), "model.weights.h5 has changed since it was written"),
    ]:
        weights.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert checkpoint.latest_checkpoint(target)[0] == first
        assert f"epoch_0002: skipped, {problem}" in caplog.text
    weights.write_bytes(data)
    (second / "average.npz").unlink()
    assert checkpoint.latest_checkpoint(target)[0] == first
    assert "epoch_0002: skipped, no average.npz" in caplog.text


def test_figures_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The picture tools write through vis.save_figure: a failure while drawing leaves the old picture."""
    from fer_keras.vis import new_figure, save_figure

    fig = new_figure(2, 2, dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    path = tmp_path / "grid.png"
    save_figure(fig, path, dpi=50)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["grid.png"]

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", fail)
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, path)
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["grid.png"]
