"""Test-session isolation: every test run gets its own kiln home; base images stay cached between runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def kiln_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("kiln-home")
    os.environ["KILN_HOME"] = str(home)
    os.environ.pop("KILN_DATABASE_URL", None)
    return home
