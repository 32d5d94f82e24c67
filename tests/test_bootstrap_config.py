"""What the bootstrap base is built with, checked without building it: the cloud-init config keeps the published
image usable on OpenStack and EC2, the small initramfs keeps every cloud's root-disk driver, and each text written
into the image is part of the digest that names the cached base (a change rebuilds it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from clouds import bootstrap


def test_the_base_finds_the_local_seed_first_and_still_finds_openstack_and_ec2_metadata() -> None:
    config = yaml.safe_load(bootstrap.CLOUD_CFG)
    sources = config["datasource_list"]
    assert sources[0] == "NoCloud", "the local cloud's seed is found without probing anything else"
    assert {"ConfigDrive", "OpenStack", "Ec2"} <= set(sources), "a published image must find its cloud's metadata"
    assert sources[-1] == "None"


def test_the_initramfs_keeps_every_clouds_root_disk_driver_and_unpacks_fast() -> None:
    assert "MODULES=list" in bootstrap.INITRAMFS_CONF.splitlines()
    assert "COMPRESS=lz4" in bootstrap.INITRAMFS_CONF.splitlines()
    assert "lz4" in bootstrap.BASE_PACKAGES, "without the lz4 tool mkinitramfs falls back to gzip"
    drivers = bootstrap.INITRAMFS_HOOK.splitlines()[-1].split()
    assert drivers[0] == "manual_add_modules"
    assert {"virtio_blk", "virtio_scsi", "xen_blkfront", "hv_storvsc", "sd_mod"} <= set(drivers[1:])


def test_the_initramfs_hook_is_valid_sh_and_answers_prereqs_with_nothing(tmp_path: Path) -> None:
    hook = tmp_path / "kiln-root-disks"
    hook.write_text(bootstrap.INITRAMFS_HOOK)
    subprocess.run(["sh", "-n", str(hook)], check=True)
    done = subprocess.run(["sh", str(hook), "prereqs"], capture_output=True, text=True, check=True)
    assert done.stdout == ""


@pytest.mark.parametrize("name", ["CLOUD_CFG", "INITRAMFS_CONF", "INITRAMFS_HOOK", "NETWORK", "WAIT_ONLINE"])
def test_every_text_written_into_the_image_is_part_of_the_bases_digest(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = bootstrap.digest_of(bootstrap.inputs_for("debian-bookworm", None))
    monkeypatch.setattr(bootstrap, name, getattr(bootstrap, name) + "# changed\n")
    assert bootstrap.digest_of(bootstrap.inputs_for("debian-bookworm", None)) != before
