#!/bin/sh
# Leave a mark the verify probe can read back from the finished image.
set -eu
echo "hello from kiln" > /etc/kiln-hello
chmod 0644 /etc/kiln-hello
