"""moto's EC2/S3/SSM server on 127.0.0.1 for the EC2 tests: dummy credentials, validations on, reset per test."""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SSM_AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
ACCOUNT = "123456789012"  # moto's default account


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ThreadedMotoServer for the session, reached through endpoint_url; never the user's AWS config."""
    aws = tmp_path_factory.mktemp("aws")
    env = {
        "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
        "MOTO_ENABLE_AMI_VALIDATION": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(Path(aws) / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(Path(aws) / "credentials"),
    }
    saved = {key: os.environ.get(key) for key in [*env, "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    from moto import settings
    from moto.server import ThreadedMotoServer

    # moto reads these at import: set them on the module too, in case something imported moto earlier
    settings.ENABLE_KEYPAIR_VALIDATION = True
    settings.ENABLE_AMI_VALIDATION = True
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def moto(moto_server: str) -> str:
    """The moto endpoint, empty: every backend reset before the test."""
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    return moto_server
