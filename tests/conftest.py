"""Shared fixtures.

The mount fixtures drive the real ``cowfs`` CLI: ``cowfs mkfs`` a pool in a
temporary directory, ``cowfs mount`` it (the command returns once the FUSE
mount is live) and, at teardown, detach loop devices backed by its volumes,
unmount and wait for the daemon to exit.  A per-test watchdog aborts the FUSE
connections of a test that overruns, so a hung daemon fails that test instead
of hanging the suite.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Generator, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # helpers_mount, whatever the import mode

from helpers_mount import (  # noqa: E402
    REPO,
    CowfsMount,
    Watchdog,
    force_unmount,
    loop_attach,
    loop_detach,
    run,
)

log = logging.getLogger(__name__)

# Seconds a mount test may run before the watchdog aborts its FUSE mounts;
# a test can ask for more with @pytest.mark.mount_timeout(SECONDS).
DEFAULT_MOUNT_TIMEOUT = 180.0


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers used by the mount tests."""
    config.addinivalue_line(
        "markers", "mount: integration test through a real cowfs FUSE mount (needs root, /dev/fuse)")
    config.addinivalue_line(
        "markers", "mount_timeout(seconds): watchdog limit for one mount test")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's outcome on the item, so that teardown keeps the
    pool of a failed test for inspection and deletes the others."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _test_failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture(scope="session")
def cowfs_bin() -> Path:
    """Path of the ``cowfs`` CLI ($COWFS_BIN, else the repository's venv, else
    PATH).  Skips when the kernel has no FUSE device or we are not root."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("kernel has no FUSE support: /dev/fuse is missing")
    if os.geteuid() != 0:
        pytest.skip("mount tests need root (mount, losetup, fusermount3)")
    candidates = [os.environ.get("COWFS_BIN"), str(REPO / ".venv" / "bin" / "cowfs"),
                  shutil.which("cowfs")]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return Path(cand)
    pytest.fail("the cowfs CLI is not installed: no $COWFS_BIN, .venv/bin/cowfs or cowfs on PATH "
                "(install the project into .venv first)")


@pytest.fixture(scope="session")
def loop_devices() -> None:
    """Skips when the kernel has no loop devices."""
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("kernel has no loop device support: /dev/loop-control is missing")


@pytest.fixture
def watchdog(request: pytest.FixtureRequest) -> Iterator[Watchdog]:
    """A timer that aborts this test's FUSE mounts if the test overruns."""
    marker = request.node.get_closest_marker("mount_timeout")
    dog = Watchdog(float(marker.args[0]) if marker else DEFAULT_MOUNT_TIMEOUT)
    yield dog
    dog.cancel()
    if dog.fired:
        pytest.fail("the watchdog aborted this test's FUSE mounts: the test overran its time limit")


@pytest.fixture(params=["c", "python"])
def checksum_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test twice: with cowfs._oneblock's checksums taken by xxHash's
    C function, and through xxhash's Python function (the fallback when that
    C function is not found).  The C run is skipped where it is not found."""
    from cowfs._oneblock import native_checksums
    if request.param == "c" and not native_checksums(True):
        pytest.skip("xxhash's XXH3_64bits_dispatch not found on this machine")
    native_checksums(request.param == "c")
    try:
        yield request.param
    finally:
        native_checksums(True)


@pytest.fixture
def cleanup(request: pytest.FixtureRequest) -> Iterator[contextlib.ExitStack]:
    """A LIFO stack of teardown callbacks shared by the factories below, so
    that things are undone in the reverse order the test made them (a cowfs
    mount whose pool lives on a loop-mounted file system goes first)."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def make_cowfs(cowfs_bin: Path, tmp_path: Path, watchdog: Watchdog,
               cleanup: contextlib.ExitStack,
               request: pytest.FixtureRequest) -> Callable[..., CowfsMount]:
    """Factory: ``make_cowfs(pool=None, mnt=None, mkfs=True, mount=True,
    mkfs_args=())`` makes a pool (default under tmp_path), optionally runs
    ``cowfs mkfs`` and ``cowfs mount``, and registers its teardown."""
    count = 0

    def factory(pool: Path | None = None, mnt: Path | None = None, mkfs: bool = True,
                mount: bool = True, mkfs_args: tuple[str, ...] = ()) -> CowfsMount:
        nonlocal count
        count += 1
        pool = pool or tmp_path / f"pool{count}"
        mnt = mnt or tmp_path / f"mnt{count}"
        logdir = tmp_path / f"logs{count}"
        for d in (pool, mnt, logdir):
            d.mkdir(parents=True, exist_ok=True)
        cm = CowfsMount(cowfs_bin, pool, mnt, logdir)
        watchdog.mounts.append(mnt)

        def teardown() -> None:
            cm.teardown()
            tracebacks = cm.daemon_tracebacks()
            if not _test_failed(request):
                # Volumes written by the tests add up; keep only failed pools.
                shutil.rmtree(pool, ignore_errors=True)
            if tracebacks:
                # An exception the daemon did not handle is a bug even when
                # the request it broke went unnoticed by the test.
                pytest.fail(f"the cowfs daemon logged a Python traceback ({logdir}):\n"
                            + "\n---\n".join(tracebacks), pytrace=False)

        cleanup.callback(teardown)
        if mkfs:
            cm.mkfs(*mkfs_args)
        if mount:
            cm.mount()
        return cm

    return factory


@pytest.fixture
def pool(make_cowfs: Callable[..., CowfsMount]) -> CowfsMount:
    """A freshly made pool, not mounted."""
    return make_cowfs(mount=False)


@pytest.fixture
def mounted(make_cowfs: Callable[..., CowfsMount]) -> CowfsMount:
    """A freshly made pool, mounted."""
    return make_cowfs()


@pytest.fixture
def make_small_fs(tmp_path: Path, loop_devices: None,
                  cleanup: contextlib.ExitStack) -> Callable[[int], Path]:
    """Factory: ``make_small_fs(size)`` makes an ext4 file system of ``size``
    bytes on a loop device, mounts it and returns its mount directory; used to
    give a pool a small, private file system (full-disk and df tests)."""
    count = 0

    def factory(size: int) -> Path:
        nonlocal count
        count += 1
        image = tmp_path / f"smallfs{count}.img"
        where = tmp_path / f"smallfs{count}"
        where.mkdir()
        with open(image, "wb") as fh:
            fh.truncate(size)
        dev = loop_attach(image)

        def teardown() -> None:
            force_unmount(where)
            loop_detach(dev)
            image.unlink(missing_ok=True)

        cleanup.callback(teardown)
        run(["mkfs.ext4", "-q", "-F", dev], timeout=120, check=True)
        run(["mount", dev, where], timeout=60, check=True)
        return where

    return factory


@pytest.fixture(scope="module")
def fio() -> str:
    """Path of fio (installed by the project's dependencies)."""
    path = shutil.which("fio")
    if path is None:
        pytest.skip("fio is not installed")
    return path
