"""OVA packaging: an OVF 1.0 descriptor, a manifest of sha256 digests and a streamOptimized vmdk in a tar."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from clouds import qemu
from core.digests import sha256_file

VMDK_STREAM_FORMAT = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# CIM operating-system id 96 is "Debian 64-Bit"; 101 is "Other Linux (64-Bit)", our fallback.
OS_TYPES = {"debian": (96, "Debian 64-bit"), "linux": (101, "Other Linux 64-bit")}


def ovf_descriptor(
    name: str,
    disk_file: str,
    disk_file_size: int,
    capacity_bytes: int,
    *,
    cpus: int = 2,
    memory_mb: int = 2048,
    os_type: str = "debian",
    annotation: str = "",
) -> str:
    """The OVF 1.0 envelope for one VM with one streamOptimized disk on an IDE controller and one NIC.

    Debian's cloud kernel (the bootstrap base's) has drivers for PIIX IDE and VMXNET3 but none for LSI Logic
    SCSI, AHCI or E1000, so those are the devices named here: the disk boots in VMware and VirtualBox alike,
    and the NIC works in VMware (VirtualBox users pick virtio-net, or bake linux-image-amd64 into the base).
    """
    os_id, os_label = OS_TYPES.get(os_type, OS_TYPES["linux"])
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xml:lang="en-US"
    xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href={quoteattr(disk_file)} ovf:id="file1" ovf:size="{disk_file_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="{capacity_bytes}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1"
        ovf:fileRef="file1" ovf:format="{VMDK_STREAM_FORMAT}"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks</Info>
    <Network ovf:name="NAT">
      <Description>The network the first NIC attaches to</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id={quoteattr(name)}>
    <Info>A virtual machine built by kiln</Info>
    <Name>{escape(name)}</Name>
    <AnnotationSection>
      <Info>How this image was made</Info>
      <Annotation>{escape(annotation)}</Annotation>
    </AnnotationSection>
    <OperatingSystemSection ovf:id="{os_id}">
      <Info>The guest operating system</Info>
      <Description>{os_label}</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{escape(name)}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-07 virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory size</rasd:Description>
        <rasd:ElementName>{memory_mb} MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory_mb}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>IDE controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:Description>VMXNET3 ethernet adapter on "NAT"</rasd:Description>
        <rasd:ElementName>Ethernet 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>VMXNET3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def manifest(entries: dict[str, str]) -> str:
    """The .mf file: one 'SHA256(name)= digest' line per file, as ovftool and VirtualBox read it."""
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in entries.items())


def build_ova(
    source: Path,
    out: Path,
    name: str,
    *,
    cpus: int,
    memory_mb: int,
    annotation: str = "",
) -> None:
    """source disk (any qemu-img format) → out.ova: descriptor first, then manifest, then the disk."""
    work = out.parent / f".{out.name}.parts"
    work.mkdir(exist_ok=True)
    try:
        vmdk_name = f"{name}-disk1.vmdk"
        vmdk = work / vmdk_name
        qemu.run(
            [qemu.QEMU_IMG, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(source), str(vmdk)],
            what="qemu-img convert to streamOptimized vmdk",
        )
        capacity = int(qemu.image_info(source)["virtual-size"])
        descriptor = ovf_descriptor(
            name, vmdk_name, vmdk.stat().st_size, capacity, cpus=cpus, memory_mb=memory_mb, annotation=annotation
        ).encode()
        ovf_name, mf_name = f"{name}.ovf", f"{name}.mf"
        (work / ovf_name).write_bytes(descriptor)
        mf = manifest({ovf_name: hashlib.sha256(descriptor).hexdigest(), vmdk_name: sha256_file(vmdk)})
        (work / mf_name).write_text(mf)
        partial = out.with_name(out.name + ".part")
        # OVF 1.0 §5.3: the descriptor first, the manifest next, then the files in References order.
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member in (ovf_name, mf_name, vmdk_name):
                info = tar.gettarinfo(str(work / member), arcname=member)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mode = 0o644
                with open(work / member, "rb") as handle:
                    tar.addfile(info, handle)
        partial.replace(out)
    finally:
        for item in work.glob("*"):
            item.unlink()
        work.rmdir()
