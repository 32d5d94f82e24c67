#!/bin/sh
# The bench's provisioning, run as root by both kiln and Packer: files kept in the image, and a scratch
# download that is unpacked and removed again (what apt and most installers do), leaving freed blocks behind.
set -eu
mkdir -p /opt/kiln-bench
echo "provisioned for the kiln vs Packer bench" > /etc/kiln-bench
head -c 16M /dev/urandom > /opt/kiln-bench/payload.bin
head -c 48M /dev/urandom > /var/tmp/download.bin
sha256sum /var/tmp/download.bin > /opt/kiln-bench/download.sha256
rm -f /var/tmp/download.bin
ls -l /opt/kiln-bench
