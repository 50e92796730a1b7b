"""Errors that fer_keras reports to users as one line instead of a traceback."""


class FerError(Exception):
    """Base class: an error whose message is complete enough to show on its own."""

    # Exit at once after reporting, skipping interpreter shutdown (runtimes left broken, e.g.
    # collectives after a lost worker, print unrelated errors while shutting down).
    hard_exit = False


class DataError(FerError):
    """Bad input data; the message names the file and the row or image."""


class ConfigError(FerError):
    """A flag or argument combination that cannot work."""


class ModelError(FerError):
    """A model file that cannot be loaded or used."""


class WorkerLostError(FerError):
    """A multi-worker run lost a peer; the collective runtime cannot shut down cleanly."""

    hard_exit = True
