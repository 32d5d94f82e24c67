"""Hostile input: crafted recipes, odd files, fuzzed YAML and broken settings are refused in one line each, exit 2,
within seconds, never with a traceback; an EC2 build that would open SSH to the world stops before any cloud call."""

from __future__ import annotations

import codecs
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from core.recipe import MAX_RECIPE_BYTES, RecipeError, load_recipe
from kiln.cli import app

REPO = Path(__file__).resolve().parent.parent
HOSTILE_DIR = Path("tests/data/hostile")  # relative to REPO, as a user would type it
HOSTILE = sorted((REPO / HOSTILE_DIR).glob("*.yaml"))
EXAMPLES = sorted((REPO / "recipes").glob("*.yaml"))
KILN = Path(sys.executable).with_name("kiln")
BOMB = HOSTILE_DIR / "alias_bomb_9_levels.yaml"

runner = CliRunner()


def expectation(path: Path) -> tuple[str, int | None]:
    """The `# expect: fragment` and optional `# line: N` header (the file may be UTF-16 or not even text)."""
    data = path.read_bytes()
    text = data.decode("utf-16") if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else \
        data.decode("utf-8", errors="replace")
    expect = re.search(r"^# expect: (.+)$", text, re.MULTILINE)
    line = re.search(r"^# line: (\d+)$", text, re.MULTILINE)
    assert expect, f"{path.name} has no '# expect:' header"
    return expect.group(1).strip(), int(line.group(1)) if line else None


def assert_refused(result, shown: str, fragment: str | None = None) -> list[str]:  # noqa: ANN001 - a click Result
    """Exit 2, nothing on stdout, no traceback, and every stderr line one `file[:line]: …` problem."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(f"{shown}:") for line in lines), result.stderr
    if fragment is not None:
        assert any(fragment in line for line in lines), result.stderr
    return lines


# ---------------------------------------------------------------- the crafted recipes


def test_there_are_at_least_40_hostile_recipes_each_stating_its_expectation() -> None:
    assert len(HOSTILE) >= 40
    for path in HOSTILE:
        expectation(path)


@pytest.mark.parametrize("path", HOSTILE, ids=lambda path: path.stem)
def test_hostile_recipe_is_refused_in_one_line_per_problem_exit_2_within_2_seconds(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    shown = str(HOSTILE_DIR / path.name)
    fragment, line = expectation(path)

    started = time.monotonic()
    result = runner.invoke(app, ["validate", shown])
    took = time.monotonic() - started

    lines = assert_refused(result, shown, fragment)
    assert took < 2, f"{took:.2f}s"
    if line is not None:
        assert any(text.startswith(f"{shown}:{line}: ") and fragment in text for text in lines), result.stderr


def test_the_real_command_refuses_an_alias_bomb_in_about_a_second_naming_aliases() -> None:
    started = time.monotonic()
    result = subprocess.run([str(KILN), "validate", str(BOMB)], cwd=REPO, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"{BOMB}:5: invalid YAML: aliases expand this to more than 5000 values (an alias " \
                            "bomb?); a recipe is far smaller\n"
    assert took < 2, f"{took:.2f}s for the whole process (interpreter and imports included)"
    started = time.monotonic()
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe(REPO / BOMB)
    assert time.monotonic() - started < 0.5  # the loader itself: it counts values, it never expands them


def test_the_real_command_names_every_hostile_recipe_in_one_run() -> None:
    shown = [str(HOSTILE_DIR / path.name) for path in HOSTILE]

    result = subprocess.run([str(KILN), "validate", *shown], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    for name in shown:
        assert f"{name}:" in result.stderr


@pytest.mark.timeout(30)  # a FIFO or a device read the ordinary way would hang or fill memory: fail, do not wait
def test_what_is_not_a_regular_file_of_sane_size_is_refused_before_it_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    sock_path = tmp_path / "sock.yaml"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    expected = {fifo: "is a named pipe (FIFO)", zero: "is a character device", directory: "is a directory",
                sock_path: "is a socket", big: "is larger than 256 KiB", tmp_path / "missing.yaml": "no such recipe"}
    try:
        for path, fragment in expected.items():
            started = time.monotonic()
            result = runner.invoke(app, ["validate", str(path)])
            assert_refused(result, str(path), fragment)
            assert time.monotonic() - started < 2
    finally:
        listener.close()


@settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    example=st.sampled_from(EXAMPLES),
    mutations=st.lists(
        st.tuples(
            st.sampled_from(["insert", "delete", "duplicate-line", "anchor"]),
            st.floats(0, 1),
            st.text(alphabet=st.sampled_from(list("&*[]{}:,!|>-#%@'\"\n\t ?<=~\\\x1b\u202e0aZ9.")), max_size=12),
        ),
        min_size=1, max_size=6,
    ),
)
def test_mutated_examples_either_load_or_raise_only_the_recipe_error_quickly(
    fuzz_dir: Path, example: Path, mutations: list[tuple[str, float, str]]
) -> None:
    text = example.read_text()
    for kind, where, fragment in mutations:
        at = int(where * len(text))
        if kind == "insert":
            text = text[:at] + fragment + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + len(fragment) + 1:]
        elif kind == "duplicate-line":
            start = text.rfind("\n", 0, at) + 1
            end = text.find("\n", at) + 1 or len(text)
            text = text[:end] + text[start:end] + text[end:]
        else:  # an anchor here and aliases to it there: the raw stuff of bombs and recursion
            text = text[:at] + f"&a{len(fragment)} " + text[at:] + f"\nx: [*a{len(fragment)}, *a{len(fragment)}]\n"
    recipe = fuzz_dir / example.name
    recipe.write_text(text)
    try:
        load_recipe(recipe)
    except RecipeError as error:
        assert error.lines() and all(line.startswith(f"{recipe}") and "\n" not in line for line in error.lines())


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/ (so the files the examples reference exist) to write mutated recipes into."""
    directory = tmp_path_factory.mktemp("fuzz") / "recipes"
    shutil.copytree(REPO / "recipes", directory)
    return directory


# ---------------------------------------------------------------- EC2: nothing open to the world


@pytest.fixture
def ec2_endpoint() -> Iterator[dict]:
    """An HTTP endpoint that records every request: an EC2 endpoint_url that must never be called."""
    calls: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            calls.append(self.path)
            self.send_response(500)
            self.end_headers()

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "calls": calls}
    server.shutdown()
    server.server_close()


def test_kiln_build_of_an_ec2_target_without_ssh_cidr_exits_2_before_anything_is_created(
    tmp_path: Path, ec2_endpoint: dict
) -> None:
    recipe = tmp_path / "open.yaml"
    recipe.write_text(f"""name: open-to-the-world
version: 1.0.0
targets:
  ec2:
    region: us-east-1
    endpoint_url: {ec2_endpoint["url"]}
    base: {{image: ami-0123456789abcdef0}}
    ssh_user: admin
""")

    result = runner.invoke(app, ["build", str(recipe)])

    [line] = assert_refused(result, str(recipe), "targets.ec2.ssh_cidr: is required with ssh_interface: public")
    assert line.startswith(f"{recipe}:4: ") and "`auto`" in line
    assert ec2_endpoint["calls"] == []  # no key pair, security group or instance was even asked for
    from provenance import lineage

    assert lineage.list_builds(recipe="open-to-the-world") == []  # no build was started


# ---------------------------------------------------------------- settings kiln cannot work with


def _unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process may not create files in: chmod for a user, sysfs for root (who ignores modes)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    directory = tmp_path / "read-only-home"
    directory.mkdir()
    directory.chmod(0o500)
    return directory


def _bad_settings(tmp_path: Path) -> dict[str, tuple[dict[str, str], str]]:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite database" * 100)
    file_home = tmp_path / "a-file"
    file_home.write_text("not a directory")
    return {
        "garbage url": ({"KILN_DATABASE_URL": "garbage"}, "KILN_DATABASE_URL: cannot use the database garbage: "),
        "unreachable postgresql": ({"KILN_DATABASE_URL": "postgresql+psycopg2://kiln:s3cret@127.0.0.1:1/kiln"},
                                   "KILN_DATABASE_URL: cannot use the database postgresql+psycopg2://kiln:***@"),
        "unknown driver": ({"KILN_DATABASE_URL": "nosuchdb://host/kiln"}, "Can't load plugin"),
        "corrupt sqlite": ({"KILN_DATABASE_URL": f"sqlite:///{corrupt}"}, "file is not a database"),
        "a directory": ({"KILN_DATABASE_URL": f"sqlite:///{tmp_path}"}, "unable to open database file"),
        "read-only home": ({"KILN_HOME": str(_unwritable_directory(tmp_path))}, "KILN_HOME: "),
        "home is a file": ({"KILN_HOME": str(file_home)}, f"KILN_HOME: {file_home} exists and is not a directory"),
    }


COMMANDS = [["builds"], ["images"], ["show", "0123abcd"], ["lineage", "img-0123456789ab"], ["db", "upgrade"],
            ["cleanup", "0123abcd"], ["revoke", "img-0123456789ab", "--reason", "a test"], ["gc", "--dry-run"]]


@pytest.mark.parametrize("case", ["garbage url", "unreachable postgresql", "unknown driver", "corrupt sqlite",
                                  "a directory", "read-only home", "home is a file"])
def test_every_command_turns_a_bad_setting_into_one_line_naming_it_exit_2(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, fragment = _bad_settings(tmp_path)[case]
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    recipe = REPO / "recipes/hello.yaml"
    for command in [*COMMANDS, ["build", str(recipe), "--target", "local"]]:
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (command, result.exception)
        [line] = result.stderr.splitlines()
        assert line.startswith("error: ") and fragment in line and "s3cret" not in line, (command, line)


def test_a_bad_public_ip_url_setting_stops_an_auto_build_before_prefect_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "auto.yaml"
    recipe.write_text("name: auto\nversion: 1.0.0\ntargets:\n  ec2: {region: us-east-1, base: {image: ami-1}, "
                      "ssh_cidr: auto}\n")
    monkeypatch.setenv("KILN_PUBLIC_IP_URL", "file:///etc/hostname")

    result = runner.invoke(app, ["build", str(recipe)])

    assert result.exit_code == 2 and result.stderr == (
        "error: KILN_PUBLIC_IP_URL: 'file:///etc/hostname' is not an http:// or https:// URL\n")


def test_kiln_cleanup_of_an_empty_id_is_one_line_exit_2() -> None:
    result = runner.invoke(app, ["cleanup", ""])
    assert result.exit_code == 2
    assert result.stderr == "error: give the id of the build to clean up (see `kiln builds`)\n"


def test_the_database_and_the_data_directory_are_created_for_their_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "fresh" / "kiln"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)

    assert runner.invoke(app, ["builds"]).exit_code == 0

    assert home.stat().st_mode & 0o777 == 0o700
    assert (home / "kiln.db").stat().st_mode & 0o777 == 0o600
    for companion in home.glob("kiln.db-*"):  # SQLite's -wal and -shm take the database's mode
        assert companion.stat().st_mode & 0o777 == 0o600, companion


def test_kilns_prefect_runs_send_no_telemetry() -> None:
    probe = ("import kiln.cli\n"
             "from prefect._internal.analytics import is_telemetry_enabled\n"
             "from prefect.settings import get_current_settings\n"
             "print(is_telemetry_enabled(), get_current_settings().server.analytics_enabled)\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "CI")}

    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)

    assert result.stdout.split() == ["False", "False"], result.stderr
