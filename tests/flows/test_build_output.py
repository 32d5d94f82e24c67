"""What a failed `kiln build` prints: the failed stage, the reason and the `kiln show` line, never a traceback, nor
Prefect's own run logs (they go to the Prefect API, the details to the step log). No guest: fetch_base fails."""

from __future__ import annotations

from pathlib import Path

from provenance import lineage
from tests.flows.conftest import committed_recipe, run_kiln


def test_a_failed_build_prints_stage_reason_and_kiln_show_and_no_traceback(tmp_path: Path, prefect_api: str) -> None:
    recipe = committed_recipe(tmp_path, "name: no-such-base\nversion: 1.0.0\n"
                                        "targets:\n  local: {base: {image: img-000000000000}}\n")

    result = run_kiln("build", str(recipe), timeout=600)

    assert result.returncode == 1, result.stdout + result.stderr
    [build] = lineage.list_builds(recipe="no-such-base")
    failure, details = result.stdout.splitlines()[-2:]
    assert failure.startswith("✗ local: failed in fetch_base: base.image: img-000000000000 is not a local kiln image")
    assert details == f"  details: kiln show {build.build.id} --logs"
    for noise in ("Traceback", "Task run failed", "Finished in state", "telemetry"):
        assert noise not in result.stdout + result.stderr, result.stderr
