"""deployments/prefect.yaml deploys for real against a Prefect server, with typed parameters and the nightly cron."""

from __future__ import annotations

import asyncio
import subprocess

from prefect.client.orchestration import get_client

from tests.conftest import REPO
from tests.prefect_server import PREFECT, prefect_server, server_env


def _prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([str(PREFECT), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


async def _read(api_url: str) -> tuple:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            build = await client.read_deployment_by_name("build-recipe/build-image")
            nightly = await client.read_deployment_by_name("nightly-rebuild/nightly-rebuild")
            reaper = await client.read_deployment_by_name("reaper/reaper")
            pool = await client.read_work_pool("kiln")
            names = {d.name for d in await client.read_deployments()}
            return build, nightly, reaper, pool, names


def test_prefect_yaml_deploys_build_and_nightly_against_a_server(tmp_path):
    with prefect_server(tmp_path) as api_url:
        env = server_env(tmp_path, api_url)
        _prefect(["work-pool", "create", "kiln", "--type", "process", "--base-job-template",
                  "deployments/work-pool.json"], env)
        _prefect(["deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)
        build, nightly, reaper, pool, names = asyncio.run(_read(api_url))

    assert build.entrypoint == "flows.build:build_recipe"
    request = build.parameter_openapi_schema["definitions"]["BuildRequest"]["properties"]
    assert {"recipe", "targets", "on_error", "require_clean"} <= set(request)
    assert request["on_error"]["enum"] == ["cleanup", "abort"]
    assert build.work_pool_name == "kiln"
    assert str(REPO) in str(build.job_variables.get("working_dir"))
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC"
    assert nightly.entrypoint == "flows.nightly:nightly_rebuild"
    assert names == {"build-image", "nightly-rebuild", "audit", "reaper"}
    assert pool.type == "process"
    assert pool.base_job_template["variables"]["properties"]["stream_output"]["default"] is False
    assert reaper.entrypoint == "flows.reaper:reaper"
    assert [s.schedule.cron for s in reaper.schedules] == ["17 * * * *"]
    assert reaper.parameters == {"older_than": "15m"}
