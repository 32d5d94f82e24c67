#!/bin/sh
# The "packages" workload's packages and files, run as root by Packer (and by bench.packer's plain chroot): what
# kiln's customize does for recipes/webserver.yaml's `packages: [apache2]` (tasks/customize.py's apt command) and
# its files entry (the page, uploaded to /tmp first). recipes/scripts/setup.sh runs after it.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold apache2
mkdir -p /var/www/html
install -o root -g root -m 0644 /tmp/kiln-bench-test.txt /var/www/html/test.txt
rm -f /tmp/kiln-bench-test.txt
