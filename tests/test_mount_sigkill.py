"""SIGKILL of the daemon under load: every write whose fsync returned before
the kill reads back exactly after a remount, no volume ever shows bytes that
were not written to it, and volume creations and deletions made durable by
fsync of the directory stay done."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import helpers_mount
from helpers_mount import (
    MIB,
    CowfsMount,
    check_churn_after_crash,
    check_volume_after_crash,
    pid_alive,
    read_file,
    read_writer_log,
    wait_until,
)

pytestmark = [pytest.mark.mount, pytest.mark.mount_timeout(240)]
log = logging.getLogger(__name__)

VOLUMES = 3
VOL_SIZE = 32 * MIB
ROUNDS = 3
MIN_ACKED = 5  # per round, over all volumes: below this the round proves little


def run_writer(mounted: CowfsMount, names: list[str], seed: int, log_prefix: Path,
               delay: float, stop: Callable[[], object]) -> None:
    """Run the record writer (one thread per volume in ``names`` plus the
    volume churn) for ``delay`` seconds, then call ``stop`` (which takes the
    daemon down) and make sure the writer is gone."""
    writer = subprocess.Popen(
        [sys.executable, helpers_mount.__file__, "writer", "--seed", str(seed),
         "--size", str(VOL_SIZE), "--log-prefix", str(log_prefix),
         "--churn", str(mounted.mnt), *[str(mounted.mnt / n) for n in names]],
        stdin=subprocess.DEVNULL)
    try:
        time.sleep(delay)
        assert writer.poll() is None, f"writer exited early with {writer.returncode}"
        stop()
        # With the daemon gone every pending request fails and the writer
        # threads stop; SIGKILL covers one stuck anyway.
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(timeout=5)
    finally:
        if writer.poll() is None:
            writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)


def verify_round(mounted: CowfsMount, names: list[str], seed: int, log_prefix: Path,
                 models: list[bytearray], churn: dict[str, str]) -> dict[str, str]:
    """Check the remounted pool against the writer's logs (see
    check_volume_after_crash and check_churn_after_crash); update ``models``
    in place and return the new churn model."""
    acked = 0
    for vol, name in enumerate(names):
        wlog = read_writer_log(Path(f"{log_prefix}.{vol}"))
        acked += len(wlog.acked)
        actual = read_file(mounted.mnt / name)
        models[vol] = check_volume_after_crash(models[vol], actual, vol, seed, wlog)
        log.info("volume %d: %d acknowledged, in flight %s, errors %s",
                 vol, len(wlog.acked), wlog.started, wlog.errors)
    assert acked >= MIN_ACKED, f"only {acked} records acknowledged in the run"
    churn = check_churn_after_crash(churn, mounted.mnt, Path(f"{log_prefix}.churn"))
    log.info("%d small volumes exist", len(churn))
    assert sorted(os.listdir(mounted.mnt)) == sorted(names + list(churn))
    return churn


def make_volumes(mounted: CowfsMount) -> list[str]:
    """Create the writer's volumes, VOL_SIZE bytes each, all zeros."""
    names = [f"vm{i}.img" for i in range(VOLUMES)]
    for name in names:
        os.close(os.open(mounted.mnt / name, os.O_CREAT | os.O_RDWR, 0o644))
        os.truncate(mounted.mnt / name, VOL_SIZE)
    return names


def test_sigkill_daemon_keeps_fsynced_writes(mounted: CowfsMount, tmp_path: Path) -> None:
    """Three rounds: three writer threads (one per volume) write random
    records, each fsynced and logged outside the mount once acknowledged,
    while a fourth creates and deletes small volumes; the daemon is SIGKILLed
    after 1-3 s; after clearing the dead mount and remounting, acknowledged
    records read back exactly, the record in flight holds old or new bytes,
    and the set of small volumes is exactly the acknowledged one (give or
    take the operation in flight)."""
    seed = random.randrange(1 << 30)
    log.info("sigkill test seed %d", seed)
    rng = random.Random(seed)
    names = make_volumes(mounted)
    models = [bytearray(VOL_SIZE) for _ in names]
    churn: dict[str, str] = {}
    for rnd in range(ROUNDS):
        log_prefix = tmp_path / f"writer-round{rnd}"
        run_writer(mounted, names, seed * 10 + rnd, log_prefix, rng.uniform(1.0, 3.0),
                   mounted.kill_daemon)
        mounted.clear_dead_mount()
        mounted.mount()
        log.info("round %d:", rnd)
        churn = verify_round(mounted, names, seed * 10 + rnd, log_prefix, models, churn)
    assert pid_alive(mounted.daemon_pid())


def test_sigterm_under_load_unmounts_and_keeps_data(mounted: CowfsMount, tmp_path: Path) -> None:
    """SIGTERM while writers are busy: the daemon unmounts and exits within
    30 s without help, and after a remount everything acknowledged is there
    (same checks as the SIGKILL test)."""
    seed = random.randrange(1 << 30)
    log.info("sigterm test seed %d", seed)
    names = make_volumes(mounted)
    log_prefix = tmp_path / "writer"
    pid = mounted.daemon_pid()
    run_writer(mounted, names, seed, log_prefix, 1.5, lambda: os.kill(pid, signal.SIGTERM))
    assert wait_until(lambda: not mounted.is_mounted(), 30), "still mounted 30 s after SIGTERM"
    mounted.wait_daemon_exit(pid)
    mounted.mount()
    verify_round(mounted, names, seed, log_prefix, [bytearray(VOL_SIZE) for _ in names], {})
