# cowfs developer entry points.
#
#   make run        set up, create the default pool if needed, mount it (foreground)
#   make test       set up, run the test suite (needs root: FUSE, loop devices)
#   make test-slow  the slow tests only
#   make bench      fio: cowfs vs. qcow2 (qemu-storage-daemon), a pyfuse3 ceiling and
#                   a plain file; then snapbench
#   make snapbench  snapshots and clones vs. data, count and depth, side by side with qcow2
#   make soak       stress run: fio --verify, snapshots, restores, SIGKILLs (DURATION=30m)
#   make install    install cowfs, mount.cowfs and cowfs@.service system-wide
#   make uninstall  remove what make install installed (configs are kept)
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
# qemu-utils provides qemu-img (the snapshot contract says it reads images);
# qemu-system-common provides qemu-storage-daemon, whose FUSE export of a
# qcow2 image is the peer make bench measures cowfs against.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-dev \
                python3-venv fio e2fsprogs util-linux kmod attr qemu-utils \
                qemu-system-common

# Privileged commands go through sudo unless we already are root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# Where `make install` puts things.  The service unit and the mount helper
# name INSTALL_VENV and BINDIR, so change them here rather than moving files.
INSTALL_VENV ?= /opt/cowfs
BINDIR       ?= /usr/local/bin
SBINDIR      ?= /sbin
UNITDIR      ?= /etc/systemd/system
CONFDIR      ?= /etc/cowfs

.PHONY: help deps sysdeps run test test-slow bench snapbench clean distclean

help:
	@sed -n '3,/^#$$/s/^#//p' $(firstword $(MAKEFILE_LIST))

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

# Reinstall whenever pyproject.toml or the C source changes (or the venv is
# new); an existing venv without the stamp gets the project installed into it
# once.  The editable install builds cowfs/_oneblock*.so next to its source.
$(VENV)/.stamp: pyproject.toml cowfs/_oneblock.c $(VENV)/pyvenv.cfg | sysdeps
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

# The bench extra (matplotlib for the chart, py-spy) is installed on demand.
$(VENV)/.bench-stamp: $(VENV)/.stamp
	$(VPY) -m pip install -e '.[test,bench]'
	touch $@

bench: deps $(VENV)/.bench-stamp
	$(SUDO) $(VPY) tools/bench.py $(BENCH_ARGS)
	$(SUDO) $(VPY) tools/snapbench.py $(SNAPBENCH_ARGS)

snapbench: deps $(VENV)/.bench-stamp
	$(SUDO) $(VPY) tools/snapbench.py $(SNAPBENCH_ARGS)

# Long-running stress (not part of `make test`): fio --verify on volumes
# through loop devices, snapshots/clones/restores on a timer, daemon SIGKILLs,
# fsck after each.  `make soak DURATION=5m SOAK_ARGS="--size 256M"`.
DURATION  ?= 30m
SOAK_ARGS ?=
.PHONY: soak
soak: deps
	$(SUDO) $(VPY) tools/soak.py --duration $(DURATION) $(SOAK_ARGS)

# A venv of its own at INSTALL_VENV with a regular (non-editable) install of
# this tree, so that the installed cowfs does not change when the checkout
# does; then the entry points, the mount(8) helper (also as mount.fuse.cowfs,
# for fstab lines giving the type /proc/mounts shows), the unit and the
# example configuration (an edited one is never overwritten).  The helper
# runs Python isolated (-I): mount(8) may run it in any directory, and that
# directory must not be able to shadow cowfs's modules.
.PHONY: install uninstall
install: sysdeps
	$(SUDO) $(PYTHON) -m venv '$(INSTALL_VENV)'
	@# setuptools builds in ./build, and a stale copy there of a module since
	@# removed would be installed again.
	$(SUDO) rm -rf build
	$(SUDO) '$(INSTALL_VENV)/bin/pip' install --quiet --upgrade .
	$(SUDO) install -d -m 0755 '$(BINDIR)' '$(SBINDIR)' '$(UNITDIR)' '$(CONFDIR)'
	$(SUDO) ln -sfn '$(INSTALL_VENV)/bin/cowfs' '$(BINDIR)/cowfs'
	printf '#!/bin/sh\n# mount(8) helper for cowfs file systems (make install)\nexec %s -I -m cowfs_tools.mount_helper "$$@"\n' \
	  '$(INSTALL_VENV)/bin/python' | $(SUDO) tee '$(SBINDIR)/mount.cowfs' >/dev/null
	$(SUDO) chmod 0755 '$(SBINDIR)/mount.cowfs'
	$(SUDO) ln -sfn mount.cowfs '$(SBINDIR)/mount.fuse.cowfs'
	sed 's|/usr/local/bin/cowfs|$(BINDIR)/cowfs|g' systemd/cowfs@.service \
	  | $(SUDO) tee '$(UNITDIR)/cowfs@.service' >/dev/null
	$(SUDO) chmod 0644 '$(UNITDIR)/cowfs@.service'
	@if [ -e '$(CONFDIR)/example.conf' ]; then \
	  echo "keeping $(CONFDIR)/example.conf"; \
	else \
	  $(SUDO) install -m 0644 systemd/example.conf '$(CONFDIR)/example.conf'; \
	fi
	@if [ -d /run/systemd/system ]; then $(SUDO) systemctl daemon-reload; fi
	@echo "installed: $(BINDIR)/cowfs, $(SBINDIR)/mount.cowfs, $(UNITDIR)/cowfs@.service," \
	  "$(CONFDIR)/example.conf, $(INSTALL_VENV)"

# Refused while a pool is mounted: its daemon runs from INSTALL_VENV.
# Enabled cowfs@ instances are disabled; pool configurations other than an
# unchanged example.conf stay in CONFDIR.
uninstall:
	@if grep -q ' - fuse\.cowfs ' /proc/self/mountinfo; then \
	  echo "cowfs pools are still mounted; unmount them (or stop their cowfs@ services) first:"; \
	  grep ' - fuse\.cowfs ' /proc/self/mountinfo | cut -d' ' -f5; \
	  exit 1; \
	fi
	@for link in $$(find '$(UNITDIR)' -mindepth 2 -maxdepth 2 -type l -name 'cowfs@*.service'); do \
	  echo "disabling $$(basename "$$link")"; $(SUDO) rm -f "$$link"; \
	done
	$(SUDO) rm -f '$(UNITDIR)/cowfs@.service' '$(SBINDIR)/mount.cowfs' '$(SBINDIR)/mount.fuse.cowfs'
	@if [ -L '$(BINDIR)/cowfs' ] && [ "$$(readlink '$(BINDIR)/cowfs')" = '$(INSTALL_VENV)/bin/cowfs' ]; then \
	  $(SUDO) rm -f '$(BINDIR)/cowfs'; \
	fi
	@if [ -e '$(INSTALL_VENV)/pyvenv.cfg' ]; then $(SUDO) rm -rf '$(INSTALL_VENV)'; fi
	@if cmp -s systemd/example.conf '$(CONFDIR)/example.conf'; then \
	  $(SUDO) rm -f '$(CONFDIR)/example.conf'; \
	fi
	@$(SUDO) rmdir '$(CONFDIR)' 2>/dev/null || echo "keeping $(CONFDIR) and the configurations in it"
	@if [ -d /run/systemd/system ]; then $(SUDO) systemctl daemon-reload; fi

# Build and test leftovers; the venv stays (see distclean).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis $(VENV)/.stamp
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
