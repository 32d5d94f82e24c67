"""pytest plugin for the OpenStack tests: one real Keystone + Glance per session (tests.openstack_server), and
the OpenStackCloud that reaches it. Test modules load it with `pytest_plugins = ["tests.clouds.openstack_fixtures"]`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clouds.openstack import OpenStackCloud
from tests.openstack_server import OpenStackServers, openstack_servers


@pytest.fixture(scope="session")
def openstack_test_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenStackServers]:
    """Keystone and Glance on 127.0.0.1 for the whole session; afterwards their processes are gone.

    KILN_TEST_OPENSTACK_SERVERS=<json file written by a running tests.openstack_server> reuses servers someone
    else started and stops (iterating on a test without two minutes of start-up each time)."""
    reuse = os.environ.get("KILN_TEST_OPENSTACK_SERVERS")
    if reuse:
        yield OpenStackServers(**json.loads(Path(reuse).read_text()))
        return
    with openstack_servers(tmp_path_factory.mktemp("openstack")) as servers:
        yield servers
    deadline = time.monotonic() + 10
    for pid in servers.pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"uwsgi {pid} still runs after the session"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def glance(openstack_test_servers: OpenStackServers) -> Iterator[OpenStackCloud]:
    """The test cloud as admin (clouds.yaml entry kiln-test), connection closed after the test."""
    cloud = OpenStackCloud("kiln-test", config_files=[str(openstack_test_servers.clouds_yaml)])
    yield cloud
    cloud.close()


@pytest.fixture
def partner(openstack_test_servers: OpenStackServers) -> Iterator[OpenStackCloud]:
    """The same cloud as a member of the partner project (the other side of image sharing)."""
    cloud = OpenStackCloud("kiln-test-partner", config_files=[str(openstack_test_servers.clouds_yaml)])
    yield cloud
    cloud.close()
