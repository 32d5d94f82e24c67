"""Test-only fault injection, loaded by the `kiln build` subprocesses of tests/faults through PYTHONPATH.

KILN_KEY_DUMP=FILE writes the build's private key there once launch made it, so the test can look for it
in everything the build left (the secret scan); it is the test's copy, outside kiln's directories.

KILN_FAULT="SIGNAL:STAGE:POINT" makes the process signal itself (SIGKILL or SIGINT) when the build reaches
STAGE, at POINT: `start` (the stage has begun, nothing of it done yet), or `after-launch` / `after-snapshot`
(the cloud call has just returned the new instance or image, before the ledger hears of it). Nothing of this
is in kiln's code paths: it wraps them from outside, in this process only.

KILN_TEST_SHARED_GUEST=FILE makes the pre-booted guest FILE describes play every EC2 and OpenStack instance
(tests/shared_guest.py), so the stages after launch run over SSH without a boot per build.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("KILN_FAULT", "")
_KEY_DUMP = os.environ.get("KILN_KEY_DUMP", "")
_SHARED_GUEST = os.environ.get("KILN_TEST_SHARED_GUEST", "")


def _fire(signame: str) -> None:
    os.kill(os.getpid(), getattr(signal, signame))
    if signame == "SIGINT":
        return  # the main thread raises KeyboardInterrupt; this thread carries on until its next call fails


def _install(signame: str, stage: str, point: str) -> None:
    import clouds
    from tasks.common import LISTENERS

    current = {"stage": None}

    class Listener:
        def stage_changed(self, plan, name, status):  # noqa: ANN001, ANN201
            if _KEY_DUMP and name == "launch" and status == "succeeded" and plan.build_key is not None:
                with open(os.open(_KEY_DUMP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as dump:
                    dump.write(plan.build_key.private_key)
            if status == "running":
                current["stage"] = name
                if name == stage and point == "start":
                    _fire(signame)

        def note(self, plan, name, text):  # noqa: ANN001, ANN201
            pass

        def line(self, plan, name, line):  # noqa: ANN001, ANN201
            pass

    LISTENERS.append(Listener())
    if point in ("start", "never"):
        return
    method = point.removeprefix("after-")
    real_open = clouds.open_cloud

    def open_cloud(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        cloud = real_open(*args, **kwargs)
        real = getattr(cloud, method)

        def wrapped(*a, **k):  # noqa: ANN002, ANN003, ANN202
            result = real(*a, **k)
            if current["stage"] == stage:
                _fire(signame)
            return result

        setattr(cloud, method, wrapped)
        return cloud

    clouds.open_cloud = open_cloud  # flows.build binds it by name when it is first imported, after this


if _SHARED_GUEST:  # first, so the fault's wrapper below wraps the guest's clouds
    import clouds
    from tests.shared_guest import route

    clouds.open_cloud = route(clouds.open_cloud)

if _SPEC or _KEY_DUMP:
    _install(*(_SPEC or "SIGKILL:none:never").split(":"))
