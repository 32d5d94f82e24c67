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
    # Customize layers of this run only: a layer kept by an earlier run would let a build skip the steps a test
    # watches run (bases stay in the user's cache: bootstrapping one takes minutes).
    os.environ["KILN_LAYER_CACHE"] = str(tmp_path_factory.mktemp("kiln-layers"))
    os.environ.pop("KILN_DATABASE_URL", None)
    return home
