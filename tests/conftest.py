"""Test-session isolation: every test run gets its own kiln home; base images stay cached between runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Session fixtures every directory uses, registered once: a fixture imported into a test module is that module's
# own, so each importing module started one more server that ran until the session ended.
pytest_plugins = ["tests.clouds.moto_ec2"]


@pytest.fixture(scope="session", autouse=True)
def kiln_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("kiln-home")
    os.environ["KILN_HOME"] = str(home)
    # Customize layers of this run only: a layer kept by an earlier run would let a build skip the steps a test
    # watches run (bases stay in the user's cache: bootstrapping one takes minutes).
    os.environ["KILN_LAYER_CACHE"] = str(tmp_path_factory.mktemp("kiln-layers"))
    os.environ.pop("KILN_DATABASE_URL", None)
    return home


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for every flow test; in-process flows and `kiln` subprocesses both use it."""
    from tests.prefect_server import prefect_server

    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as api_url:
        saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
        os.environ.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(home))
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}):
            yield api_url
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
