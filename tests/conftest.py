"""Shared fixtures: an isolated data cache per test session and the optional real data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "fer2013.csv.gz"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Parsed-data caches go to a temporary folder, never the user's ~/.cache."""
    old = os.environ.get("FER_KERAS_CACHE")
    os.environ["FER_KERAS_CACHE"] = str(tmp_path_factory.mktemp("fer_cache"))
    yield
    if old is None:
        os.environ.pop("FER_KERAS_CACHE", None)
    else:
        os.environ["FER_KERAS_CACHE"] = old


@pytest.fixture
def fer2013_path() -> Path:
    """The full FER2013 file of the shared folder; tests using it skip when it is absent."""
    path = Path(os.environ.get("FER2013_CSV", FER2013))
    if not path.is_file():
        pytest.skip(f"FER2013 not available at {path}")
    return path
