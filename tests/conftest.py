"""Fixtures shared by every test module."""
from __future__ import annotations

import pytest

from tests.gcs_emulator import gcs_emulator


@pytest.fixture(scope="session")
def gcs():
    """One local GCS emulator for the whole session: gcsfs keeps its client per process, so a
    second emulator on another port would not be reached by this process."""
    with gcs_emulator() as emulator:
        yield emulator
