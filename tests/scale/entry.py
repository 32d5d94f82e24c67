"""The scale-out test's deployment entrypoint (tests.scale.entry:build_recipe): kiln's build_recipe flow, in a
worker process that first routes EC2 instances to the shared test guest (tests/shared_guest.py)."""

from tests.shared_guest import install

install()

from flows.build import build_recipe  # noqa: E402

__all__ = ["build_recipe"]
