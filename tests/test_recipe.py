"""Recipes: malformed ones are refused naming file, field and line; good ones validate; fingerprints and schema."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from core.recipe import (
    SANITIZE_OPERATIONS,
    EC2Target,
    LocalTarget,
    OpenStackTarget,
    Problem,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_json_schema,
)
from kiln.cli import app

REPO = Path(__file__).resolve().parent.parent
BAD_DIR = Path("tests/data/bad_recipes")  # relative to REPO, as a user would type it
BAD_RECIPES = sorted((REPO / BAD_DIR).glob("*.yaml"))
EXAMPLES = sorted((REPO / "recipes").glob("*.yaml"))
KILN = Path(sys.executable).parent / "kiln"

runner = CliRunner()


def expectation(path: Path) -> tuple[str, int | None]:
    """The `# expect: fragment` and optional `# line: N` header of a bad recipe."""
    text = path.read_text()
    expect = re.search(r"^# expect: (.+)$", text, re.MULTILINE)
    line = re.search(r"^# line: (\d+)$", text, re.MULTILINE)
    assert expect, f"{path.name} has no '# expect:' header"
    return expect.group(1).strip(), int(line.group(1)) if line else None


def problem_text(output: str, shown: str) -> list[str]:
    """Each output line with its `file[:line]: ` prefix removed; every line must carry that prefix."""
    lines = output.splitlines()
    assert lines, "no output"
    for line in lines:
        assert re.match(rf"^{re.escape(shown)}(:\d+)?: ", line), f"line does not name the file: {line!r}"
    return [re.sub(rf"^{re.escape(shown)}(:\d+)?: ", "", line) for line in lines]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- bad recipes through the CLI


def test_there_are_at_least_35_bad_recipes_and_each_states_its_expectation() -> None:
    assert len(BAD_RECIPES) >= 35
    for path in BAD_RECIPES:
        expectation(path)


@pytest.mark.parametrize("path", BAD_RECIPES, ids=lambda path: path.stem)
def test_bad_recipe_is_refused_with_exit_2_naming_file_field_and_line(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    shown = str(BAD_DIR / path.name)
    fragment, line = expectation(path)

    result = runner.invoke(app, ["validate", shown])

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "\x1b[" not in result.stderr  # plain text when not a terminal
    assert any(fragment in text for text in problem_text(result.stderr, shown)), result.stderr
    if line is not None:
        assert any(
            text.startswith(f"{shown}:{line}: ") and fragment in text for text in result.stderr.splitlines()
        ), result.stderr


def test_real_kiln_command_exits_2_and_names_every_bad_recipe() -> None:
    shown = [str(BAD_DIR / path.name) for path in BAD_RECIPES]

    result = subprocess.run(
        [str(KILN), "validate", "recipes/webserver.yaml", *shown],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2, result.stderr
    assert result.stdout.startswith("✓ recipes/webserver.yaml  webserver 1.0.0  fingerprint ")
    for name in shown:
        assert f"{name}:" in result.stderr


def test_real_kiln_command_refuses_one_bad_recipe_with_its_line() -> None:
    result = subprocess.run(
        [str(KILN), "validate", str(BAD_DIR / "file_src_dotdot_escape.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr == (
        "tests/data/bad_recipes/file_src_dotdot_escape.yaml:9: files[0].src: "
        "../../etc/shadow points outside the recipe's directory\n"
    )


def test_missing_recipe_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")

    result = runner.invoke(app, ["validate", missing])

    assert result.exit_code == 2
    assert result.stderr == f"{missing}: no such recipe file\n"


# ---------------------------------------------------------------- good recipes


def test_example_recipes_validate_with_exit_0_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    shown = [f"recipes/{path.name}" for path in EXAMPLES]
    assert {"recipes/webserver.yaml", "recipes/dstat.yaml", "recipes/hello.yaml"} <= set(shown)

    result = runner.invoke(app, ["validate", *shown])

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(shown)
    for name, line in zip(shown, lines, strict=True):
        recipe = load_recipe(name)
        assert line == f"✓ {name}  {recipe.name} {recipe.version}  fingerprint {recipe.fingerprint()[:12]}"


def test_real_kiln_command_accepts_the_examples() -> None:
    result = subprocess.run(
        [str(KILN), "validate", *[f"recipes/{path.name}" for path in EXAMPLES]],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("✓") == len(EXAMPLES)


def test_webserver_example_says_what_the_design_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/webserver.yaml")

    assert recipe.packages == ["apache2"]
    assert (REPO / "recipes" / recipe.files[0].src).read_text().strip() == "SUCCESSFUL TEST"
    assert recipe.files[0].dest == "/var/www/html/test.txt"
    assert [probe.label for probe in recipe.verify] == ["http :80/test.txt", "command systemctl is-active apache2"]
    assert recipe.verify[0].http is not None and recipe.verify[0].http.expect == "SUCCESSFUL TEST"
    assert {name: recipe.target_kind(name) for name in recipe.targets} == {
        "local": "local", "ec2": "ec2", "openstack": "openstack"
    }
    ec2 = recipe.target("ec2")
    assert isinstance(ec2, EC2Target)
    assert ec2.base.name == "debian-12-amd64-*" and ec2.base.owners == ["136693071363"]
    assert ec2.ssh_user == "admin"
    assert recipe.outputs.formats == ["qcow2", "ova"]
    assert recipe.probe_ports() == [80]


def test_hello_example_needs_no_packages_and_probes_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/hello.yaml")

    assert recipe.packages == []
    assert [probe.kind for probe in recipe.verify] == ["command", "port"]
    assert recipe.probe_ports() == [22]
    assert "zero-free-space" not in recipe.sanitize.selected()


# ---------------------------------------------------------------- problems, lines and messages


MINIMAL = """\
name: demo
version: 1.0.0
targets:
  local:
    base: {bootstrap: debian-bookworm}
"""


def test_every_problem_is_collected_with_its_exact_line(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", """\
name: demo
version: 1.0.0
targets:
  local:
    base: {bootstrap: debian-bookworm}
    memory: 4096
  sierra:
    base: {image: debian-12}
files:
  - src: files/missing.txt
    dest: etc/motd
    mode: "999"
verify:
  - http: {port: 0}
""")

    with pytest.raises(RecipeError) as raised:
        load_recipe(path)

    assert raised.value.problems == [
        Problem("targets.local.memory", "unknown key (did you mean 'memory_mb'?)", 6),
        Problem("targets.sierra.cloud", raised.value.problems[1].message, 7),
        Problem("files[0].src", f"files/missing.txt does not exist (relative to {tmp_path}/)", 10),
        Problem("files[0].dest", "etc/motd is relative; give an absolute path in the guest, like /etc/motd", 11),
        Problem("files[0].mode", "'999' is not an octal file mode like \"0644\"", 12),
        Problem("verify[0].http.port", "must be >= 1, got 0", 14),
    ]
    assert "say which cloud" in raised.value.problems[1].message
    assert raised.value.file == path


def test_error_renders_file_as_given_line_field_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "recipes/x.yaml", MINIMAL + "files:\n  - {src: files/test.txt, dest: /var/www/html/test.txt}\n")

    with pytest.raises(RecipeError) as raised:
        load_recipe("recipes/x.yaml")

    assert str(raised.value) == (
        "recipes/x.yaml:7: files[0].src: files/test.txt does not exist (relative to recipes/)"
    )


def test_missing_key_points_at_its_parent_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", "# a comment\nname: demo\nversion: 1.0.0\ntargets:\n  ec2:\n"
                                        "    base: {image: ami-0123456789abcdef0}\n")

    with pytest.raises(RecipeError) as raised:
        load_recipe(path)

    assert raised.value.problems == [Problem("targets.ec2.region", "is required", 5)]


def test_yaml_syntax_error_gives_the_yaml_line(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", MINIMAL + "packages: [apache2\nfiles: []\n")

    with pytest.raises(RecipeError) as raised:
        load_recipe(path)

    [problem] = raised.value.problems
    assert problem.field == "" and problem.line == 7 and problem.message.startswith("invalid YAML: ")


def test_unknown_cloud_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", "name: demo\nversion: '1'\ntargets:\n  prod: {cloud: gcp, base: {image: x}}\n")

    with pytest.raises(RecipeError) as raised:
        load_recipe(path)

    assert raised.value.problems == [
        Problem("targets.prod.cloud", "unknown cloud 'gcp'; kiln knows local, ec2, openstack", 4)
    ]


def test_bootstrap_base_is_refused_for_ec2_and_openstack(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", """\
name: demo
version: 1.0.0
targets:
  ec2: {region: eu-west-1, base: {bootstrap: debian-bookworm}}
  openstack: {flavor: m1.small, base: {bootstrap: debian-bookworm}}
""")

    with pytest.raises(RecipeError) as raised:
        load_recipe(path)

    assert [(problem.field, problem.line) for problem in raised.value.problems] == [
        ("targets.ec2.base.bootstrap", 4), ("targets.openstack.base.bootstrap", 5)
    ]


def test_symlink_inside_the_recipe_directory_is_allowed(tmp_path: Path) -> None:
    write(tmp_path, "files/real.txt", "content\n")
    (tmp_path / "files/link.txt").symlink_to("real.txt")
    path = write(tmp_path, "demo.yaml", MINIMAL + "files: [{src: files/link.txt, dest: /etc/motd}]\n")

    assert load_recipe(path).files[0].src == "files/link.txt"


def test_symlinked_directory_leading_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, "secret.txt", "secret\n")
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    (recipe_dir / "files").symlink_to(outside)
    path = write(recipe_dir, "demo.yaml", MINIMAL + "files: [{src: files/secret.txt, dest: /etc/motd}]\n")

    with pytest.raises(RecipeError) as raised:
        load_recipe(path)

    assert raised.value.problems[0].field == "files[0].src"
    assert "resolves outside" in raised.value.problems[0].message


def test_base_file_is_checked_against_its_sha256(tmp_path: Path) -> None:
    write(tmp_path, "images/base.qcow2", "not really a disk\n")
    digest = "a45ac3f0d2dfb7e1b5a7b2b1f7e6a2b0ed1c6b1f4c6bd3b8e4d1e24c3e7f1cb0"
    actual = hashlib.sha256(b"not really a disk\n").hexdigest()
    good = MINIMAL.replace("{bootstrap: debian-bookworm}", f"{{file: images/base.qcow2, sha256: {actual}}}")
    assert load_recipe(write(tmp_path, "good.yaml", good)).target("local").base.kind == "file"

    bad = write(tmp_path, "bad.yaml", good.replace(actual, digest))
    with pytest.raises(RecipeError) as raised:
        load_recipe(bad)
    assert raised.value.problems == [
        Problem("targets.local.base.sha256", f"images/base.qcow2 has sha256 {actual}, not {digest}", 5)
    ]


# ---------------------------------------------------------------- the model's helpers


def test_target_named_after_its_cloud_needs_no_cloud_key_and_others_can_say_it(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", """\
name: demo
version: 1.0.0
targets:
  local: {base: {bootstrap: debian-bookworm}}
  ec2: {region: us-east-1, base: {ssm_parameter: /aws/service/debian/release/12/latest/amd64}, ssh_cidr: auto}
  openstack: {flavor: m1.small, base: {name: debian-12}}
  sierra: {cloud: openstack, flavor: m1.large, base: {image: 6e5959e9-f349-420f-b77c-5485306fdc25}}
  lab: {cloud: local, base: {url: "https://example.org/d.qcow2", sha256: "%s"}, accel: tcg}
""" % ("0" * 64))

    recipe = load_recipe(path)

    assert isinstance(recipe.target("local"), LocalTarget)
    assert isinstance(recipe.target("ec2"), EC2Target)
    sierra = recipe.target("sierra")
    assert isinstance(sierra, OpenStackTarget)
    assert sierra.effective_os_cloud("sierra") == "sierra"
    assert recipe.target_kind("lab") == "local"
    assert [recipe.target(name).base.kind for name in recipe.targets] == [
        "bootstrap", "ssm_parameter", "name", "image", "url"
    ]
    with pytest.raises(KeyError, match="no target 'gcp'"):
        recipe.target_kind("gcp")


def test_scripts_accept_a_path_a_mapping_or_inline_text_and_get_names(tmp_path: Path) -> None:
    write(tmp_path, "scripts/a.sh", "echo a\n")
    write(tmp_path, "scripts/b.sh", "echo b\n")
    path = write(tmp_path, "demo.yaml", MINIMAL + """\
scripts:
  - scripts/a.sh
  - {path: ./scripts/b.sh, env: {GREETING: hello}}
  - inline: echo c
  - {inline: echo d, name: last step}
""")

    scripts = load_recipe(path).scripts

    assert [(script.path, script.inline, script.name) for script in scripts] == [
        ("scripts/a.sh", None, "scripts/a.sh"),
        ("scripts/b.sh", None, "scripts/b.sh"),
        (None, "echo c", "inline-3"),
        (None, "echo d", "last step"),
    ]
    assert scripts[1].env == {"GREETING": "hello"}


def test_sanitize_runs_every_operation_but_the_disabled_in_registry_order(tmp_path: Path) -> None:
    sanitize = "sanitize: {disable: [logfiles, ssh-hostkeys]}\n"
    path = write(tmp_path, "demo.yaml", MINIMAL + sanitize)

    selected = load_recipe(path).sanitize.selected()

    assert selected == [name for name in SANITIZE_OPERATIONS if name not in ("logfiles", "ssh-hostkeys")]
    assert load_recipe(write(tmp_path, "all.yaml", MINIMAL)).sanitize.selected() == list(SANITIZE_OPERATIONS)


def test_sanitize_enable_runs_only_the_named_operations_in_registry_order_and_not_with_disable(tmp_path: Path) -> None:
    only = load_recipe(write(tmp_path, "only.yaml", MINIMAL + "sanitize: {enable: [tmp-files, machine-id]}\n"))
    assert only.sanitize.selected() == ["machine-id", "tmp-files"]

    with pytest.raises(RecipeError, match=r"sanitize\.disable: give enable \(only these run\) or disable"):
        load_recipe(write(tmp_path, "both.yaml", MINIMAL + "sanitize: {enable: [machine-id], disable: [logfiles]}\n"))


def test_probes_have_a_kind_a_label_a_timeout_and_ports_to_open(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", MINIMAL + """\
verify:
  - command: {run: systemctl is-active ssh, expect: active, timeout: 30}
  - port: {port: 22}
  - http: {port: 8080, path: /health, status: 204}
  - http: {}
  - port: {port: 8080}
""")

    verify = load_recipe(path).verify

    assert [(probe.kind, probe.label, probe.timeout) for probe in verify] == [
        ("command", "command systemctl is-active ssh", 30),
        ("port", "port :22", 60),
        ("http", "http :8080/health", 60),
        ("http", "http :80/", 60),
        ("port", "port :8080", 60),
    ]
    assert load_recipe(path).probe_ports() == [22, 80, 8080]


def test_unquoted_yaml_numbers_keep_the_text_the_user_wrote(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", """\
name: demo
version: 1.10
targets:
  ec2: {region: us-east-1, base: {image: ami-1}, share_with: [123456789012], ssh_cidr: 203.0.113.0/24}
  local: {base: {bootstrap: debian-bookworm}}
files:
  - {src: a.txt, dest: /a, mode: 0600}
  - {src: a.txt, dest: /b, mode: 755}
""")
    write(tmp_path, "a.txt", "a\n")

    recipe = load_recipe(path)

    assert recipe.version == "1.10"
    assert [spec.mode for spec in recipe.files] == ["0600", "0755"]
    ec2 = recipe.target("ec2")
    assert isinstance(ec2, EC2Target) and ec2.share_with == ["123456789012"]


def test_referenced_files_and_path_live_outside_the_schema(tmp_path: Path) -> None:
    write(tmp_path, "files/a.txt", "a\n")
    write(tmp_path, "scripts/s.sh", "true\n")
    write(tmp_path, "base.img", "disk\n")
    path = write(tmp_path, "demo.yaml", MINIMAL.replace("{bootstrap: debian-bookworm}", "{file: base.img}") + """\
files: [{src: files/a.txt, dest: /a}, {src: files/a.txt, dest: /b}]
scripts: [scripts/s.sh, {inline: "true"}]
""")

    recipe = load_recipe(path)

    assert recipe.path == path and recipe.base_dir == tmp_path
    assert recipe.referenced_files() == [tmp_path / "base.img", tmp_path / "files/a.txt", tmp_path / "scripts/s.sh"]
    assert "path" not in recipe.model_dump() and "_path" not in recipe.model_dump()


def test_a_validated_recipe_round_trips_through_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/webserver.yaml")

    from_json = Recipe.model_validate_json(recipe.model_dump_json())
    from_dict = Recipe.model_validate(recipe.model_dump())

    assert from_json.model_dump() == from_dict.model_dump() == recipe.model_dump()
    assert from_json.path is None  # the file location is not part of the recipe


# ---------------------------------------------------------------- fingerprint


FINGERPRINTED = """\
name: site
version: 2.0.0
targets:
  local:
    base: {bootstrap: debian-bookworm}
packages: [nginx]
files:
  - {src: files/index.html, dest: /var/www/html/index.html}
scripts: [scripts/setup.sh]
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    directory = tmp_path / "site"
    write(directory, "files/index.html", "<h1>hello</h1>\n")
    write(directory, "scripts/setup.sh", "systemctl enable nginx\n")
    return write(directory, "recipe.yaml", FINGERPRINTED)


def fingerprint_of(path: Path, text: str | None = None) -> str:
    if text is not None:
        path.write_text(text)
    return load_recipe(path).fingerprint()


def test_fingerprint_is_a_sha256_hex_digest(site: Path) -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint_of(site))


def test_fingerprint_ignores_key_order_whitespace_comments_and_flow_style(site: Path) -> None:
    original = fingerprint_of(site)

    rewritten = """\
# the same recipe, written differently
scripts:
  - scripts/setup.sh      # enables the service
files:
  - dest: /var/www/html/index.html
    src: files/index.html
packages:
  - nginx
targets: {local: {base: {bootstrap: debian-bookworm}}}

version: "2.0.0"
name: site
"""

    assert fingerprint_of(site, rewritten) == original


def test_fingerprint_ignores_where_the_recipe_directory_lives(site: Path, tmp_path: Path) -> None:
    original = fingerprint_of(site)
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(site.parent, moved)

    assert fingerprint_of(moved / "recipe.yaml") == original


def test_fingerprint_ignores_defaults_written_out(site: Path) -> None:
    original = fingerprint_of(site)

    explicit = """\
name: site
version: 2.0.0
description: ""
targets:
  local:
    cloud: local
    base: {bootstrap: debian-bookworm}
    ssh_user: debian
    memory_mb: 2048
    cpus: 2
    accel: auto
packages: [nginx]
files:
  - {src: ./files/index.html, dest: /var/www/html/index.html, mode: "0644", owner: "root:root"}
scripts: [{path: scripts/setup.sh, name: scripts/setup.sh, env: {}}]
sanitize: {enable: [], disable: []}
verify: []
outputs: {formats: [qcow2]}
timeouts: {boot: 900, customize: 3600, image: 1800}
"""

    assert fingerprint_of(site, explicit) == original


def test_fingerprint_ignores_who_is_notified_and_how_long_the_image_stays_valid(site: Path) -> None:
    original = fingerprint_of(site)
    told = FINGERPRINTED + "valid_for: 2 days\nnotify: [json://127.0.0.1:9/kiln]\n"

    assert fingerprint_of(site, told) == original


def test_provenance_keeps_notification_urls_with_their_secrets_masked(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "r.yaml", "name: r\nversion: 1.0.0\ntargets: {local: {base: "
                               "{bootstrap: debian-bookworm}}}\nvalid_for: 6  Months\n"
                               "notify: ['mailto://builder:s3cret-pass@example.org', 'json://127.0.0.1:9/kiln']\n"))

    stored = recipe.stored_form()

    assert "s3cret-pass" not in json.dumps(stored) and recipe.notify[0].endswith("s3cret-pass@example.org")
    assert stored["notify"][0].startswith("mailto://builder:****@example.org")
    assert stored["notify"][1].startswith("json://127.0.0.1:9/kiln")
    assert recipe.valid_for == stored["valid_for"] == "6 months"


def test_fingerprint_changes_when_a_copied_file_changes(site: Path) -> None:
    original = fingerprint_of(site)
    (site.parent / "files/index.html").write_text("<h1>hello!</h1>\n")

    assert fingerprint_of(site) != original


def test_fingerprint_changes_when_a_script_changes(site: Path) -> None:
    original = fingerprint_of(site)
    (site.parent / "scripts/setup.sh").write_text("systemctl enable --now nginx\n")

    assert fingerprint_of(site) != original


def test_fingerprint_changes_when_a_package_is_added(site: Path) -> None:
    original = fingerprint_of(site)

    assert fingerprint_of(site, FINGERPRINTED.replace("[nginx]", "[nginx, curl]")) != original


def test_fingerprint_changes_when_a_file_is_referenced_under_another_name(site: Path) -> None:
    original = fingerprint_of(site)
    (site.parent / "files/index.html").rename(site.parent / "files/home.html")

    assert fingerprint_of(site, FINGERPRINTED.replace("files/index.html", "files/home.html")) != original


# ---------------------------------------------------------------- JSON Schema


def schema_from_cli() -> dict:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    return json.loads(result.stdout)


def test_kiln_schema_prints_a_valid_draft_2020_12_json_schema() -> None:
    schema = schema_from_cli()

    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema == recipe_json_schema()
    assert schema["additionalProperties"] is False


def test_example_recipes_satisfy_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(schema_from_cli())
    for path in EXAMPLES:
        errors = [error.message for error in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], f"{path.name}: {errors}"


@pytest.mark.parametrize("stem", [
    "unknown_top_level_key", "unknown_nested_key", "missing_name", "bad_name", "missing_version",
    "empty_targets", "target_without_cloud", "unknown_cloud_kind", "two_base_sources", "no_base_source",
    "url_without_sha256", "sha256_uppercase", "probe_two_kinds", "probe_unknown_kind", "probe_empty",
    "probe_port_out_of_range", "outputs_unknown_format", "sanitize_unknown_operation",
    "package_shell_metachars", "negative_timeout", "file_bad_mode", "ec2_missing_region",
    "openstack_missing_flavor",
])
def test_schema_also_rejects_what_needs_no_files_to_judge(stem: str) -> None:
    data = yaml.safe_load((REPO / BAD_DIR / f"{stem}.yaml").read_text())

    assert not jsonschema.Draft202012Validator(recipe_json_schema()).is_valid(data)



def test_a_local_target_chooses_the_qcow2_compression_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", """\
name: demo
version: 1.0.0
targets:
  local: {base: {bootstrap: debian-bookworm}}
  old-cloud: {cloud: local, base: {bootstrap: debian-bookworm}, qcow2_compression: zlib}
""")
    recipe = load_recipe(path)
    assert [recipe.target(t).qcow2_compression for t in ("local", "old-cloud")] == ["zstd", "zlib"]

    bad = write(tmp_path, "bad.yaml", MINIMAL.replace("base:", "qcow2_compression: lz4\n    base:", 1))
    with pytest.raises(RecipeError) as raised:
        load_recipe(bad)
    assert [p.field for p in raised.value.problems] == ["targets.local.qcow2_compression"]
