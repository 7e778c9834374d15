# cowfs developer entry points.
#
#   make run        set up, create the default pool if needed, mount it (foreground)
#   make test       set up, run the test suite (needs root: FUSE, loop devices)
#   make test-slow  the slow tests only
#   make bench      fio: cowfs volume vs. a plain file on the same disk
#   make snapbench  snapshot/clone time vs. data, count and clone depth
#
# Works on a fresh Debian 12 machine as root, or as a user who has sudo.
# Every step checks before it acts, so running a target twice is harmless.

SHELL := /bin/bash

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
COWFS  := $(VENV)/bin/cowfs
POOL   ?= /var/lib/cowfs/default
MOUNT  ?= /mnt/cowfs
PYTEST_ARGS ?=
BENCH_ARGS  ?=
SNAPBENCH_ARGS ?=

# fuse3/libfuse3-dev/pkg-config and a C toolchain with Python headers build and
# run pyfuse3; python3-venv provides ensurepip for Debian's python3; fio,
# e2fsprogs (mkfs.ext4, fsck) and util-linux (losetup) are used by the tests
# and the benchmark; kmod provides modprobe; attr provides getfattr;
# qemu-utils provides qemu-img (the snapshot contract says it reads images).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-dev \
                python3-venv fio e2fsprogs util-linux kmod attr qemu-utils

# Privileged commands go through sudo unless we already are root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: help deps sysdeps run test test-slow bench snapbench clean distclean

help:
	@sed -n '3,8s/^#//p' $(firstword $(MAKEFILE_LIST))

deps: sysdeps $(VENV)/.stamp

# apt-get update only runs when a package is actually missing.  modprobe is
# best effort: in a container the modules may be built in or not loadable.
sysdeps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'ok installed' \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update \
	  && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y --no-install-recommends $$missing; \
	fi
	@$(SUDO) modprobe loop 2>/dev/null || true
	@$(SUDO) modprobe fuse 2>/dev/null || true

$(VENV)/pyvenv.cfg: | sysdeps
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes (or the venv is new); an existing
# venv without the stamp gets the project installed into it once.
$(VENV)/.stamp: pyproject.toml $(VENV)/pyvenv.cfg | sysdeps
	$(VPY) -m pip install -e '.[test]'
	touch $@

run: deps
	@$(SUDO) mkdir -p '$(POOL)' '$(MOUNT)'
	@if [ ! -e '$(POOL)/superblock' ]; then $(SUDO) $(COWFS) mkfs '$(POOL)'; fi
	@echo "cowfs: mounting pool $(POOL) on $(MOUNT) in the foreground."
	@echo "In another shell, as root:"
	@echo "  truncate -s 20G $(MOUNT)/vm1.img"
	@echo "  dev=\$$(losetup --direct-io=on -f --show $(MOUNT)/vm1.img)"
	@echo "  mkfs.ext4 \"\$$dev\" && mkdir -p /mnt/vm1 && mount \"\$$dev\" /mnt/vm1"
	@echo "Undo: umount /mnt/vm1; losetup -d \"\$$dev\""
	@echo "Stop cowfs: Ctrl-C here, or umount $(MOUNT) (data is flushed first)."
	$(SUDO) $(COWFS) mount '$(POOL)' '$(MOUNT)' --foreground

test: deps
	$(SUDO) $(VPY) -m pytest -q $(PYTEST_ARGS)

test-slow: deps
	$(SUDO) $(VPY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: deps
	$(SUDO) $(VPY) tools/bench.py $(BENCH_ARGS)

snapbench: deps
	$(SUDO) $(VPY) tools/snapbench.py $(SNAPBENCH_ARGS)

# Build and test leftovers; the venv stays (see distclean).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis $(VENV)/.stamp
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
