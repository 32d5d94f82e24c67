#!/bin/sh
# Start Apache on every boot of the finished image and serve the test page now.
set -eu
systemctl enable apache2
systemctl restart apache2
