# kiln: `make demo` builds a real image on this machine; `make test` runs the test suite.
# Both install what they need (Debian packages, a venv, the project) and are safe to re-run.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: QEMU to run guests, mmdebstrap + extlinux to bootstrap bases, genisoimage for
# NoCloud seeds, postgresql for the PostgreSQL store tests, systemd-container + slirp4netns for container builds.
DEB_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap extlinux syslinux-common genisoimage \
	e2fsprogs fdisk openssh-client openssh-server postgresql git systemd-container slirp4netns iproute2 util-linux
BENCH_PACKAGES := packer

.PHONY: demo test setup system-deps venv lint bench clean openstack-test-venv

demo: setup
	$(KILN) build recipes/webserver.yaml --target local

test: setup openstack-test-venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	@dpkg -s $(BENCH_PACKAGES) >/dev/null 2>&1 || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BENCH_PACKAGES)
	$(PY) -m bench

setup: system-deps venv

system-deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.installed

# Keystone + Glance from PyPI for the OpenStack tests, in their own venv under ~/.cache/kiln-test (pinned in
# tests/openstack/requirements.txt; reinstalled only when the pins change). About 2-4 minutes the first time.
openstack-test-venv: venv
	$(PY) -m tests.openstack_server install

$(VENV)/.installed: pyproject.toml requirements.lock
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
