"""The tests' Prefect server: the one bench/prefect_server.py starts (bench/ imports no test module, so the helper
lives there and the tests take it from there)."""

from bench.prefect_server import PREFECT, VM_LIMITS, create_limit, free_port, prefect_server, server_env, stop_group

TEST_LIMITS = VM_LIMITS

__all__ = ["PREFECT", "TEST_LIMITS", "create_limit", "free_port", "prefect_server", "server_env", "stop_group"]
