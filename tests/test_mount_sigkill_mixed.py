"""SIGKILL of the daemon in the middle of a mixed workload through the mount.

``test_mount_sigkill.py`` kills the daemon under writes and volume
creations.  Here, while two writer threads write and fsync records to
``vm0.img`` and ``vm1.img`` (the record writer of :mod:`helpers_mount`), a
control thread works on ``vm2.img`` and everything around it, the way an
administrator would: writes with fsync, snapshots by ``touch`` and through
``.snapshots/ctl`` (also of all three volumes at one instant, while the
writers write), restores, clones of snapshots and of live volumes through
``.clones/ctl``, clone-groups, snapshot renames, snapshot deletes by ``rm``
and by ctl, clone deletes by ``rm`` plus an fsync of the directory.

A command counts as acknowledged when its ``write()`` (or ``open``,
``unlink``, ``fsync``) returned success: snapshot, restore, clone, rename
and delete of snapshots are durable when they return.  Each round the
daemon is SIGKILLed at a random moment; the dead mount is cleared, the pool
is checked offline with ``cowfs fsck`` (it must be clean), mounted again
and compared with the model of what was acknowledged:

* every acknowledged record of the writers reads back exactly, the one in
  flight holds old or new bytes (:func:`helpers_mount.check_volume_after_crash`);
* the volumes and snapshots are exactly the acknowledged ones -- the
  operation in flight at the kill counts as done or not done, wholly;
* every snapshot and clone of ``vm2.img`` (or of its snapshots) holds
  exactly the bytes the model says;
* a snapshot or clone of a writer volume taken while it was being written
  holds the volume as it was at one instant between the command's start and
  its return: every record acknowledged before the command, none begun after
  it returned, and at most one record in flight, old or new per byte.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers_mount import (
    MIB,
    CowfsMount,
    WriterLog,
    check_volume_after_crash,
    first_difference,
    pid_alive,
    read_file,
    record,
    sha256,
)

pytestmark = [pytest.mark.mount, pytest.mark.mount_timeout(120)]
log = logging.getLogger(__name__)

ROUNDS = 3
WRITERS = ("vm0.img", "vm1.img")
TARGET = "vm2.img"            # the volume the control thread writes and restores
WRITER_SIZE = 4 * MIB
TARGET_SIZE = 1 * MIB
MAX_SNAPSHOTS = 14            # these two keep the reads after each round short
MAX_CLONES = 8
SNAPS = ".snapshots"
CLONES = ".clones"
WILDCARD_UNDO = "undo-?"      # an undo snapshot whose name the kill kept from us


# ----------------------------------------------------------------------------
# The writers


@dataclass
class Rec:
    """One record of a writer: when it began and when its fsync returned."""

    seq: int
    start: float
    ack: float | None = None
    sha: str | None = None


class Writer(threading.Thread):
    """Writes records (see :func:`helpers_mount.record`) to one volume, each
    followed by fsync, until an I/O error (the daemon died)."""

    def __init__(self, path: Path, index: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.path, self.index, self.seed = path, index, seed
        self.recs: list[Rec] = []
        self.error: int | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            self.error = e.errno
            return
        try:
            seq = 0
            while True:
                offset, data = record(self.seed, self.index, seq, WRITER_SIZE)
                rec = Rec(seq, time.monotonic())
                self.recs.append(rec)
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], offset + done)
                os.fsync(fd)
                rec.ack, rec.sha = time.monotonic(), sha256(data)
                seq += 1
        except OSError as e:
            self.error = e.errno
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def writer_log(self) -> WriterLog:
        """The records in the form :func:`check_volume_after_crash` takes."""
        acked = [r.seq for r in self.recs if r.ack is not None]
        return WriterLog(acked, [r.seq for r in self.recs if r.ack is None],
                         {r.seq: r.sha for r in self.recs if r.sha}, [])


# ----------------------------------------------------------------------------
# The model of the control thread's world


@dataclass(frozen=True)
class Image:
    """Expected content of a snapshot or of a volume other than the writers':
    exact bytes, or -- for a copy of a writer volume taken this round -- the
    writer index and the window (monotonic start, return) of the command."""

    data: bytes | None = None
    window: tuple[int, float, float] | None = None


@dataclass
class Model:
    """Acknowledged state: volumes other than the writers', and snapshots."""

    volumes: dict[str, Image] = field(default_factory=dict)
    snaps: dict[tuple[str, str], Image] = field(default_factory=dict)

    def copy(self) -> "Model":
        """An independent copy (images are immutable)."""
        return Model(dict(self.volumes), dict(self.snaps))


@dataclass
class InFlight:
    """The command running when the daemon died: the state it leads to and,
    for a write to the target, the bytes that may have landed in part."""

    label: str
    after: Model
    partial: tuple[int, bytes] | None = None


class Controller(threading.Thread):
    """Runs random administrative commands against the mount and keeps the
    model of what was acknowledged, until a command fails."""

    def __init__(self, mnt: Path, model: Model, seed: int, killed: threading.Event) -> None:
        super().__init__(daemon=True)
        self.mnt, self.model, self.killed = mnt, model, killed
        self.rng = random.Random(seed)
        self.seed = seed
        self.inflight: InFlight | None = None
        self.failure: str | None = None
        self.done: Counter[str] = Counter()
        self.counter = 0

    # -- the loop --------------------------------------------------------

    def run(self) -> None:
        steps = [(self.write_target, 5), (self.snapshot_touch, 3), (self.snapshot_ctl, 2),
                 (self.snapshot_group, 2), (self.restore, 3), (self.clone, 3),
                 (self.clone_group, 1), (self.rename_snapshot, 1), (self.delete_snapshot, 4),
                 (self.delete_clone, 2)]
        funcs, weights = zip(*steps)
        while True:
            step = self.rng.choices(funcs, weights)[0]
            try:
                kind = step()
            except OSError as e:
                if not self.killed.is_set():
                    self.failure = (f"{self.inflight.label if self.inflight else step.__name__}"
                                    f" failed with {errno.errorcode.get(e.errno, e.errno)}: {e}")
                return
            except Exception as e:  # an assertion about a reply: report, don't die silently
                self.failure = f"{step.__name__}: {type(e).__name__}: {e}"
                return
            if kind:
                self.done[kind] += 1
                self.inflight = None
            time.sleep(self.rng.uniform(0.005, 0.04))

    def begin(self, label: str, after: Model, partial: tuple[int, bytes] | None = None) -> None:
        """Record the state the next command leads to, before sending it."""
        self.inflight = InFlight(label, after, partial)

    def commit(self, kind: str) -> str:
        """The command in flight was acknowledged; returns ``kind`` for the tally."""
        assert self.inflight is not None
        self.model = self.inflight.after
        return kind

    def fresh(self, prefix: str) -> str:
        """A name never used before in this test."""
        self.counter += 1
        return f"{prefix}{self.seed % 1000}-{self.counter}"

    def snapshots_of(self, vol: str) -> list[str]:
        """Names of ``vol``'s snapshots in the model (the one whose name the
        kill kept from us left out)."""
        return sorted(n for (v, n) in self.model.snaps if v == vol and n != WILDCARD_UNDO)

    def ctl(self, which: str, command: str) -> str | None:
        """One command on ``WHICH/ctl``; raises OSError if the write fails.
        Returns the reply, or None if it could not be read back (the write
        -- the acknowledgement -- had succeeded)."""
        fd = os.open(self.mnt / which / "ctl", os.O_RDWR)
        try:
            raw = command.encode()
            assert os.write(fd, raw) == len(raw)
            try:
                return os.pread(fd, 1 << 16, 0).decode()
            except OSError:
                return None
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the commands ------------------------------------------------------

    def write_target(self) -> str:
        """A record written to the target and fsynced."""
        self.counter += 1
        offset, data = record(self.seed, 2, self.counter, TARGET_SIZE)
        old = self.model.volumes[TARGET].data
        assert old is not None
        after = self.model.copy()
        after.volumes[TARGET] = Image(old[:offset] + data + old[offset + len(data):])
        self.begin(f"write {TARGET} {offset}+{len(data)}", after, (offset, data))
        fd = os.open(self.mnt / TARGET, os.O_RDWR)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        return self.commit("write")

    def _room(self, more: int) -> bool:
        return len(self.model.snaps) + more <= MAX_SNAPSHOTS

    def snapshot_touch(self) -> str | None:
        """``touch .snapshots/vm2.img/NAME``."""
        if not self._room(1):
            return None
        name = self.fresh("t")
        after = self.model.copy()
        after.snaps[(TARGET, name)] = self.model.volumes[TARGET]
        self.begin(f"touch {SNAPS}/{TARGET}/{name}", after)
        fd = os.open(self.mnt / SNAPS / TARGET / name,
                     os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY, 0o644)
        with contextlib.suppress(OSError):
            os.close(fd)
        return self.commit("snapshot (touch)")

    def snapshot_ctl(self) -> str | None:
        """``snapshot NAME vm2.img`` on .snapshots/ctl."""
        if not self._room(1):
            return None
        name = self.fresh("s")
        after = self.model.copy()
        after.snaps[(TARGET, name)] = self.model.volumes[TARGET]
        self.begin(f"snapshot {name} {TARGET}", after)
        self.ctl(SNAPS, f"snapshot {name} {TARGET}")
        return self.commit("snapshot")

    def snapshot_group(self) -> str | None:
        """``snapshot NAME vm0.img vm1.img vm2.img`` while the writers write."""
        if not self._room(3):
            return None
        name = self.fresh("g")
        after = self.model.copy()
        after.snaps[(TARGET, name)] = self.model.volumes[TARGET]
        cmd = f"snapshot {name} {' '.join(WRITERS)} {TARGET}"
        start = time.monotonic()
        # Until it returns, the window stays open (if the daemon dies now,
        # the snapshot may hold anything written until then).
        for i, vol in enumerate(WRITERS):
            after.snaps[(vol, name)] = Image(window=(i, start, math.inf))
        self.begin(cmd, after)
        self.ctl(SNAPS, cmd)
        end = time.monotonic()
        for i, vol in enumerate(WRITERS):
            after.snaps[(vol, name)] = Image(window=(i, start, end))
        return self.commit("snapshot (group, writers busy)")

    def restore(self) -> str | None:
        """``restore NAME vm2.img`` (vm2 is not open: no --force needed)."""
        names = self.snapshots_of(TARGET)
        if not names or not self._room(1):
            return None
        if (TARGET, WILDCARD_UNDO) in self.model.snaps:
            return None   # one unknown undo name at a time keeps matching simple
        name = self.rng.choice(names)
        after = self.model.copy()
        after.volumes[TARGET] = self.model.snaps[(TARGET, name)]
        after.snaps[(TARGET, WILDCARD_UNDO)] = self.model.volumes[TARGET]
        self.begin(f"restore {name} {TARGET}", after)
        for attempt in range(40):
            try:
                reply = self.ctl(SNAPS, f"restore {name} {TARGET}")
                break
            except OSError as e:
                # FUSE sends the release of our last write handle on the
                # target asynchronously: for a moment after close() the
                # daemon may still count it open for writing.
                if e.errno != errno.EBUSY or attempt == 39:
                    raise
                time.sleep(0.05)
        if reply is not None:
            assert reply.startswith("ok "), f"restore {name}: reply {reply!r}"
            undo = json.loads(reply[3:])["restored"][0]["undo"]
            after.snaps[(TARGET, undo)] = after.snaps.pop((TARGET, WILDCARD_UNDO))
        return self.commit("restore")

    def _clones_room(self, more: int) -> bool:
        return len(self.model.volumes) - 1 + more <= MAX_CLONES

    def clone(self) -> str | None:
        """``clone SRC NEW`` from a snapshot of any volume, or from the live
        target or a live writer volume."""
        if not self._clones_room(1):
            return None
        new = self.fresh("c") + ".img"
        after = self.model.copy()
        choices = [k for k in self.model.snaps if k[1] != WILDCARD_UNDO]
        roll = self.rng.random()
        writer: int | None = None
        if choices and roll < 0.5:
            vol, snap = self.rng.choice(sorted(choices))
            src, after.volumes[new] = f"{vol}@{snap}", self.model.snaps[(vol, snap)]
            kind = "clone of a snapshot"
        elif roll < 0.75:
            src, after.volumes[new] = TARGET, self.model.volumes[TARGET]
            kind = "clone of a live volume"
        else:
            writer = self.rng.randrange(len(WRITERS))
            src = WRITERS[writer]
            kind = "clone of a live volume being written"
        start = time.monotonic()
        if writer is not None:
            after.volumes[new] = Image(window=(writer, start, math.inf))
        self.begin(f"clone {src} {new}", after)
        self.ctl(CLONES, f"clone {src} {new}")
        if writer is not None:
            after.volumes[new] = Image(window=(writer, start, time.monotonic()))
        return self.commit(kind)

    def clone_group(self) -> str | None:
        """``clone-group NAME --prefix P vm0.img vm1.img vm2.img`` of a group snapshot."""
        groups = sorted(set.intersection(*({n for (v, n) in self.model.snaps if v == vol}
                                           for vol in (*WRITERS, TARGET))) - {WILDCARD_UNDO})
        if not groups or not self._clones_room(3):
            return None
        name = self.rng.choice(groups)
        prefix = self.fresh("cg") + "-"
        after = self.model.copy()
        for vol in (*WRITERS, TARGET):
            after.volumes[prefix + vol] = self.model.snaps[(vol, name)]
        cmd = f"clone-group {name} --prefix {prefix} {' '.join(WRITERS)} {TARGET}"
        self.begin(cmd, after)
        self.ctl(CLONES, cmd)
        return self.commit("clone-group")

    def rename_snapshot(self) -> str | None:
        """``rename VOL@OLD NEW`` on .snapshots/ctl."""
        keys = sorted(k for k in self.model.snaps if k[1] != WILDCARD_UNDO)
        if not keys:
            return None
        vol, old = self.rng.choice(keys)
        new = self.fresh("r")
        after = self.model.copy()
        after.snaps[(vol, new)] = after.snaps.pop((vol, old))
        self.begin(f"rename {vol}@{old} {new}", after)
        self.ctl(SNAPS, f"rename {vol}@{old} {new}")
        return self.commit("rename snapshot")

    def delete_snapshot(self) -> str | None:
        """``rm .snapshots/VOL/NAME`` or ``delete VOL@NAME`` on .snapshots/ctl."""
        keys = sorted(k for k in self.model.snaps if k[1] != WILDCARD_UNDO)
        if not keys:
            return None
        vol, name = self.rng.choice(keys)
        after = self.model.copy()
        del after.snaps[(vol, name)]
        if self.rng.random() < 0.5:
            self.begin(f"rm {SNAPS}/{vol}/{name}", after)
            os.unlink(self.mnt / SNAPS / vol / name)
            return self.commit("delete snapshot (rm)")
        self.begin(f"delete {vol}@{name}", after)
        self.ctl(SNAPS, f"delete {vol}@{name}")
        return self.commit("delete snapshot")

    def delete_clone(self) -> str | None:
        """``rm MOUNT/CLONE`` and an fsync of the mount root."""
        clones = sorted(n for n in self.model.volumes if n != TARGET)
        if not clones:
            return None
        name = self.rng.choice(clones)
        after = self.model.copy()
        del after.volumes[name]
        self.begin(f"rm {name}", after)
        os.unlink(self.mnt / name)
        dfd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            with contextlib.suppress(OSError):
                os.close(dfd)
        return self.commit("delete clone (rm)")


# ----------------------------------------------------------------------------
# Checking a remounted pool against the model


@dataclass
class Round:
    """What the checks need to know about one round's writers."""

    seed: int
    base: list[bytes]        # each writer volume's content when the round began
    recs: list[list[Rec]]


def at_instant(rnd: Round, i: int, start: float, end: float, actual: bytes) -> str | None:
    """Whether ``actual`` is writer volume ``i`` as it was at one instant
    between ``start`` and ``end``: the round's base with records 0..m applied
    for some m, every record acknowledged before ``start`` among them and
    none begun after ``end``, plus at most record m+1 in part.  Returns None
    if so, else why not."""
    recs = rnd.recs[i]
    first = sum(1 for r in recs if r.ack is not None and r.ack < start)
    last = sum(1 for r in recs if r.start < end)
    content = bytearray(rnd.base[i])
    for r in recs[:first]:
        offset, data = record(rnd.seed, i, r.seq, WRITER_SIZE)
        content[offset:offset + len(data)] = data
    why = "no record was in the window"
    for m in range(first, last + 1):
        if m > first:
            offset, data = record(rnd.seed, i, m - 1, WRITER_SIZE)
            content[offset:offset + len(data)] = data
        diff = first_difference(content, actual)
        if diff is None:
            return None
        if m < last:
            # Record m may have landed in part: every differing byte must
            # lie in it and hold its new value.
            offset, data = record(rnd.seed, i, m, WRITER_SIZE)
            mixed = bytearray(content)
            region = actual[offset:offset + len(data)]
            if all(a in (o, n) for a, o, n in zip(region, content[offset:], data)):
                mixed[offset:offset + len(data)] = region
                if first_difference(mixed, actual) is None:
                    return None
        why = f"first difference at byte {diff} against {m} records"
    return (f"not writer volume {i} at any instant of the window: {last - first + 1} "
            f"candidate states, {why}")


def read_state(mnt: Path) -> tuple[dict[str, bytes], dict[tuple[str, str], bytes]]:
    """Every volume other than the writers', and every snapshot, with its content."""
    vols = {n: read_file(mnt / n) for n in os.listdir(mnt) if n not in WRITERS}
    snaps = {}
    for vol in os.listdir(mnt / SNAPS):
        if vol == "ctl":
            continue
        for name in os.listdir(mnt / SNAPS / vol):
            snaps[(vol, name)] = read_file(mnt / SNAPS / vol / name)
    return vols, snaps


def match(model: Model, vols: dict[str, bytes], snaps: dict[tuple[str, str], bytes],
          rnd: Round, partial: tuple[int, bytes] | None) -> list[str]:
    """Every way the mount differs from ``model`` ([] = it matches).  With
    ``partial``, bytes of that write to the target may be old or new."""
    problems = []
    if set(vols) != set(model.volumes):
        problems.append(f"volumes: mount has {sorted(vols)}, model {sorted(model.volumes)}")
    wild = (TARGET, WILDCARD_UNDO) if (TARGET, WILDCARD_UNDO) in model.snaps else None
    named = set(model.snaps) - {wild}
    extra = sorted(set(snaps) - named)
    # The undo snapshot whose name we never learnt: the one unknown undo-*
    # snapshot of the target.
    undo_ok = wild is not None and len(extra) == 1 and extra[0][0] == TARGET \
        and extra[0][1].startswith("undo-")
    if named - set(snaps) or (extra and not undo_ok) or (wild and not undo_ok):
        problems.append(f"snapshots: mount has {sorted(snaps)}, model {sorted(model.snaps)}")
    pairs = [(f"volume {n}", model.volumes[n], vols[n])
             for n in sorted(set(vols) & set(model.volumes))]
    pairs += [(f"snapshot {v}@{n}", model.snaps[(v, n)], snaps[(v, n)])
              for v, n in sorted(named & set(snaps))]
    if undo_ok:
        pairs.append((f"snapshot {extra[0][0]}@{extra[0][1]}", model.snaps[wild], snaps[extra[0]]))
    for what, image, actual in pairs:
        if image.window is not None:
            why = at_instant(rnd, *image.window, actual)
            if why:
                problems.append(f"{what}: {why}")
            continue
        want = image.data
        assert want is not None
        if partial is not None and what == f"volume {TARGET}":
            offset, data = partial
            region = actual[offset:offset + len(data)]
            if len(actual) == len(want) and all(
                    a in (o, n) for a, o, n in zip(region, want[offset:], data)):
                want = want[:offset] + region + want[offset + len(region):]
        diff = first_difference(want, actual)
        if diff is not None:
            problems.append(f"{what}: first difference at byte {diff} "
                            f"({len(actual)} bytes, {len(want)} expected)")
    return problems


def settle(model: Model, vols: dict[str, bytes],
           snaps: dict[tuple[str, str], bytes]) -> Model:
    """The model once the mount matched it: every image is now the exact
    bytes read, and an undo snapshot's unknown name the one found."""
    out = Model({n: Image(vols[n]) for n in model.volumes})
    for key in model.snaps:
        if key[1] == WILDCARD_UNDO:
            found = [k for k in snaps if k not in model.snaps]
            key = found[0]
        out.snaps[key] = Image(snaps[key])
    return out


def offline_fsck(mounted: CowfsMount) -> None:
    """``cowfs fsck POOL`` on the unmounted pool must find nothing (exit 0)."""
    proc = mounted.cli("fsck", mounted.pool, timeout=120)
    assert proc.returncode == 0, (
        f"cowfs fsck {mounted.pool} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")


# ----------------------------------------------------------------------------
# The test


def make_volumes(mnt: Path) -> None:
    """The writer volumes and the target, all zeros."""
    for name, size in [(n, WRITER_SIZE) for n in WRITERS] + [(TARGET, TARGET_SIZE)]:
        os.close(os.open(mnt / name, os.O_CREAT | os.O_RDWR, 0o644))
        os.truncate(mnt / name, size)


def test_sigkill_during_mixed_workload(mounted: CowfsMount) -> None:
    """Three rounds of writers plus snapshot/restore/clone/delete commands,
    each ended by SIGKILL of the daemon at a random moment, then remount and
    offline fsck: the pool holds exactly what was acknowledged (see the
    module docstring), and the command in flight is done wholly or not at all."""
    seed = random.randrange(1 << 30)
    log.info("mixed sigkill test seed %d", seed)
    rng = random.Random(seed)
    mnt = mounted.mnt
    make_volumes(mnt)
    writer_models = [bytearray(WRITER_SIZE) for _ in WRITERS]
    model = Model({TARGET: Image(bytes(TARGET_SIZE))})
    totals: Counter[str] = Counter()
    for rnd_no in range(ROUNDS):
        rnd_seed = seed * 10 + rnd_no
        base = [bytes(m) for m in writer_models]
        killed = threading.Event()
        writers = [Writer(mnt / name, i, rnd_seed) for i, name in enumerate(WRITERS)]
        controller = Controller(mnt, model, rnd_seed, killed)
        for t in (*writers, controller):
            t.start()
        time.sleep(rng.uniform(1.0, 3.0))
        assert controller.failure is None, f"seed {seed} round {rnd_no}: {controller.failure}"
        assert controller.is_alive(), f"seed {seed} round {rnd_no}: the control thread stopped"
        killed.set()
        mounted.kill_daemon()
        for t in (*writers, controller):
            t.join(timeout=20)
            assert not t.is_alive(), f"a workload thread hangs on the dead mount: {t}"
        assert controller.failure is None, f"seed {seed} round {rnd_no}: {controller.failure}"
        mounted.clear_dead_mount()
        offline_fsck(mounted)
        mounted.mount()

        where = f"seed {seed} round {rnd_no}"
        rnd = Round(rnd_seed, base, [w.recs for w in writers])
        acked = 0
        for i, (name, w) in enumerate(zip(WRITERS, writers)):
            wlog = w.writer_log()
            acked += len(wlog.acked)
            writer_models[i] = check_volume_after_crash(
                writer_models[i], read_file(mnt / name), i, rnd_seed, wlog)
        vols, snaps = read_state(mnt)
        inflight = controller.inflight
        problems = match(controller.model, vols, snaps, rnd, None)
        if problems and inflight is not None:
            after = match(inflight.after, vols, snaps, rnd, inflight.partial)
            if not after:
                controller.model, problems = inflight.after, []
            else:
                problems = [f"versus the acknowledged state: {p}" for p in problems] + [
                    f"versus the state after {inflight.label!r}: {p}" for p in after]
        assert not problems, f"{where}: the remounted pool differs:\n" + "\n".join(problems)
        model = settle(controller.model, vols, snaps)
        totals.update(controller.done)
        log.info("%s: %d records acknowledged, commands %s, in flight at the kill: %s; "
                 "%d volumes, %d snapshots; cowfs fsck clean", where, acked,
                 dict(controller.done), inflight.label if inflight else None,
                 len(model.volumes) + len(WRITERS), len(model.snaps))
        assert acked >= 5, f"{where}: only {acked} records acknowledged"
        assert sum(controller.done.values()) >= 5, f"{where}: only {controller.done} commands"
    assert pid_alive(mounted.daemon_pid())
    log.info("totals over %d rounds: %s", ROUNDS, dict(totals))
    for kind in ("snapshot", "restore", "clone", "delete"):
        assert any(k.startswith(kind) for k in totals), (
            f"seed {seed}: no {kind} command was acknowledged in {ROUNDS} rounds: {dict(totals)}")
