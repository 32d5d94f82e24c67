"""The image audit: each thing sanitize must remove is found when it is left, on a filesystem tree, on a real
(loop-mounted, read-only) ext4 disk, and in what a booted guest reports; a finding fails verify."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from clouds.base import ImageFile, ImageRef, KeyPair
from operations.image_audit import (
    CHECKS,
    BuildGuestFacts,
    audit_booted,
    audit_disk,
    audit_script,
    audit_tree,
    checks_for,
    key_blob,
    parse_sections,
)

KEY = KeyPair.generate("kiln-test-build")
ALL = list(CHECKS)


def clean_tree(root: Path) -> Path:
    """A filesystem as sanitize leaves it."""
    for directory in ("etc/ssh", "root", "home/debian/.ssh", "var/lib/cloud", "var/lib/dbus"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config").write_text("PasswordAuthentication no\n")
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    return root


def dirty_tree(root: Path) -> Path:
    """Everything the audit looks for, left behind."""
    clean_tree(root)
    other = KeyPair.generate("someone-else")
    (root / "home/debian/.ssh/authorized_keys").write_text(f"{other.public_key}\n{KEY.public_key}\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("host key")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA host")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/cloud/instances/i-0123456789ab").mkdir(parents=True)
    (root / "var/lib/cloud/instance").symlink_to("/var/lib/cloud/instances/i-0123456789ab")
    (root / "root/.bash_history").write_text("echo secret\n")
    return root


def test_a_sanitized_tree_passes_every_check(tmp_path):
    assert audit_tree(clean_tree(tmp_path), KEY.public_key, ALL) == []


def test_every_leftover_is_found_by_its_check(tmp_path):
    findings = audit_tree(dirty_tree(tmp_path), KEY.public_key, ALL)

    assert sorted({f.check for f in findings}) == sorted(ALL)
    assert [str(f) for f in findings if f.check == "build-key"] == [
        "build-key: /home/debian/.ssh/authorized_keys holds the build public key"
    ]
    assert {f.detail for f in findings if f.check == "ssh-hostkeys"} == {
        "/etc/ssh/ssh_host_ed25519_key is in the image", "/etc/ssh/ssh_host_ed25519_key.pub is in the image",
    }  # fmt: skip


def test_another_key_in_authorized_keys_is_not_the_build_key(tmp_path):
    clean_tree(tmp_path)
    (tmp_path / "root/.ssh").mkdir()
    (tmp_path / "root/.ssh/authorized_keys").write_text(KeyPair.generate("the-users-own").public_key)

    assert audit_tree(tmp_path, KEY.public_key, ALL) == []


def test_a_check_whose_sanitize_operation_the_recipe_disabled_is_not_audited_but_the_build_key_always_is():
    assert checks_for(["ssh-hostkeys", "machine-id"]) == ["build-key", "ssh-hostkeys", "machine-id"]
    assert checks_for([]) == ["build-key"]


def test_a_real_disk_is_audited_mounted_read_only(tmp_path):
    disk = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(dirty_tree(tmp_path / "root")), str(disk)], check=True)

    findings = audit_disk(disk, KEY.public_key, ALL)

    assert sorted({f.check for f in findings}) == sorted(ALL)
    assert "kiln-audit" not in Path("/proc/mounts").read_text(), "the disk is unmounted afterwards"


def test_the_booted_image_is_judged_against_the_build_guest():
    build = BuildGuestFacts(host_key="SHA256:build", machine_id="aaaa")
    output = "\n".join([
        "== build-key", "/home/debian/.ssh/authorized_keys",
        "== shell-history", "/root/.bash_history",
        "== cloud-init-state", "i-build", "i-verify",
        "== machine-id", "aaaa",
    ])  # fmt: skip

    findings = audit_booted(output, host_key="SHA256:build", build=build, checks=ALL)

    assert sorted(f.check for f in findings) == sorted(ALL)
    fresh = "== build-key\n== shell-history\n== cloud-init-state\ni-verify\n== machine-id\nbbbb\n"
    assert audit_booted(fresh, host_key="SHA256:new", build=build, checks=ALL) == []


def test_the_audit_script_runs_on_a_real_shell_against_this_tree_layout(tmp_path):
    """The script is plain sh: its sections parse, and it names no secret (only the public key's blob)."""
    script = audit_script(key_blob(KEY.public_key))
    assert KEY.private_key.splitlines()[1] not in script
    result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert parse_sections("== build-key\n/x\n== machine-id\nabc\n") == {"build-key": ["/x"], "machine-id": ["abc"]}


def test_a_local_image_holding_the_build_key_fails_verify_before_anything_boots(tmp_path):
    from operations.image_audit import ImageAuditFailed
    from tasks.verify import audit_image_file

    disk = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    tree = clean_tree(tmp_path / "root")
    (tree / "home/debian/.ssh/authorized_keys").write_text(KEY.public_key)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(disk)], check=True)
    plan = type("Plan", (), {})()
    plan.build_key = KEY
    plan.recipe = type("Recipe", (), {"sanitize": type("S", (), {"selected": lambda self: list(CHECKS)[1:]})()})()
    image = ImageRef("local", "img-000000000000", "x", files=(ImageFile("raw", str(disk), 1, "0"),))
    lines: list[str] = []

    with disable_run_logger(), pytest.raises(ImageAuditFailed, match="build-key"):
        audit_image_file(plan, image, lines.append)
    assert any("FAIL build-key" in line for line in lines)
