"""Shared plumbing for the ``python -m fer_keras.<tool>`` entrypoints.

Entrypoints define their flags in ``define_flags()`` (called only when run as a program, so that
tests may import every module without flag clashes) and hand a plain function to :func:`run`.
"""

from __future__ import annotations

import codecs
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from fer_keras import MAX_SEED
from fer_keras.errors import ConfigError, FerError


def define_skip_bad_rows(note: str = "") -> None:
    """``--skip_bad_rows`` for the tools that read data: the data a run was trained with that flag needs it."""
    flags.DEFINE_boolean("skip_bad_rows", False, "Skip malformed data rows or images (each reported) instead of "
                         "stopping at the first." + (f" {note}" if note else ""))


def check_seed(seed: int) -> str | None:
    """What is wrong with a seed, or None."""
    return None if 0 <= seed <= MAX_SEED else f"seed must be in [0, {MAX_SEED}], got {seed}"


def define_seed(default: int, help: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """``--seed``, checked before the tool imports TensorFlow."""
    flags.DEFINE_integer("seed", default, help, flag_values=flag_values)
    flags.register_validator("seed", lambda v: check_seed(v) is None, f"--seed must be in [0, {MAX_SEED}]",
                             flag_values=flag_values)


class FlagDefiner:
    """absl's ``DEFINE_*`` and ``register_*validator`` functions bound to one :class:`absl.flags.FlagValues`, so
    that a tool's flags can also be defined into a fresh set (to read a recipe's flagfile without touching the
    program's own flags)."""

    def __init__(self, flag_values: flags.FlagValues) -> None:
        self._flag_values = flag_values

    def __getattr__(self, name: str) -> Callable:
        function = getattr(flags, name)
        return lambda *args, **kwargs: function(*args, flag_values=self._flag_values, **kwargs)


def run(main: Callable[[Sequence[str]], None]) -> None:
    """Run ``main`` under absl, turning :class:`FerError` and file-system errors (unwritable or missing
    folders) into one line on stderr and exit 2."""

    def guarded(argv: Sequence[str]) -> None:
        # absl logs at INFO by default; keep stderr for warnings and errors unless -v asks.
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            if len(argv) > 1:
                raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
            main(argv)
        except FerError as e:
            logging.flush()
            print(f"error: {e}", file=sys.stderr)
            if e.hard_exit:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            sys.exit(2)
        except OSError as e:
            logging.flush()
            where = ": ".join(str(name) for name in (e.filename, e.filename2) if name)
            print(f"error: {where + ': ' if where else ''}{e.strerror or e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    _tolerate_undecodable_names()
    app.run(guarded, flags_parser=_parse_flags)


def _tolerate_undecodable_names() -> None:
    """Let stdout and stderr print file names that are not UTF-8. Python decodes such bytes to lone surrogates,
    which a UTF-8 locale's strict stdout refuses: a tool that had done its work would end in a traceback while
    naming its output. UTF-8 streams write the original bytes back (as ``ls`` shows them); others escape them."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            utf8 = codecs.lookup(stream.encoding or "ascii").name == "utf-8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parser, with a bad flag value or an unreadable flagfile reported as one ``error:`` line (absl adds
    a usage hint line, and a flagfile that is not text would end in a traceback)."""
    try:
        return read_flags(flags.FLAGS, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def read_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """Parses ``argv`` (program name first) into ``flag_values``; a bad value or an unreadable flagfile is a
    :class:`ConfigError` of one line."""
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        raise ConfigError(str(e).removeprefix("ERROR:: ")) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{_undecodable_flagfile(argv)}: not UTF-8 text ({e.reason} at byte {e.start}); a "
                          "--flagfile holds one --flag=value per line") from None


def _undecodable_flagfile(argv: Sequence[str]) -> str:
    """The first ``--flagfile`` named on the command line that is not UTF-8 (absl's error does not name it), or
    a description when it is one those name in turn."""
    named = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("-").startswith("flagfile=")]
    for path in named:
        try:
            with open(path, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError:
            return path
        except OSError:
            continue
    return f"a flagfile that {', '.join(named) or 'the command line'} names"
