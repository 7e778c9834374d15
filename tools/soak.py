"""Soak test: fio with verification on several volumes, snapshots, clones and
restores on a timer, and the daemon SIGKILLed and remounted at random.

Run it as root from the project's venv (``make soak DURATION=30m``, or
``.venv/bin/python tools/soak.py --duration 30m``).  In a fresh work
directory under ``--dir`` it creates a pool, mounts it, and for each volume
runs one worker that attaches a loop device (``losetup --direct-io=on``) and
writes the whole volume with fio over and over, each pass in random order
with mixed block sizes, verified by fio after writing (``do_verify``) and
made durable (``end_fsync``).  Volumes alternate between two kinds of data:

* ``random``: incompressible, ``--verify=crc32c`` with a header every 4 KiB
  (catches torn, misplaced, zeroed or corrupted blocks);
* ``pattern``: compressible, ``--verify=pattern`` with the pass number and
  the offset in every block (also catches a block left from an earlier pass:
  a lost write).

After some passes the worker snapshots its volume (``cowfs snapshot``) and
records the snapshot's SHA-256: these *reference snapshots* are checked
exactly, over and over.  On a timer, a controller takes snapshots of all
volumes in the middle of their passes, clones reference snapshots (each
clone must hold the snapshot's bytes and pass fio's verification of that
pass through a loop device, then is deleted), clones live volumes under load
(which must read back without error), asks workers to restore their volume
to a reference snapshot (the worker detaches its loop device first, uses
``--force`` only if the daemon still finds the volume busy, and checks the
result exactly, by SHA-256 and by fio), and deletes snapshots to keep their
number bounded.

At random moments the daemon is SIGKILLed, in one of two ways:

* ``under-load``: with fio running through attached loop devices.  Their
  I/O fails (fio stops with I/O errors, which are expected and not counted
  as mismatches); the soak then detaches the loop devices;
* ``detached``: the workers finish their pass, detach their loop devices and
  wait; then the daemon is killed with only the controller's work in flight.

Each time, the dead mount is cleared, ``cowfs fsck`` checks the pool offline
(it must be clean), the pool is mounted again, and every reference snapshot
must hold exactly its recorded bytes; after a ``detached`` kill every
volume must also pass fio's verification of its last pass (the data was
fsynced), and after an ``under-load`` kill every volume must read back
without I/O errors.

The final report (stdout, and ``report.json`` in the work directory) counts
operations, faults injected and mismatches.  Exit status 0 means no
verification mismatch, no fsck finding and no unexpected error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cowfs_tools.loopdev import attached_loops, volume_path
from cowfs_tools.procs import running

log = logging.getLogger("cowfs.soak")

MiB = 1 << 20
KINDS = ("random", "pattern")
BSSPLIT = "4k/40:16k/30:64k/30"
REFERENCE_SNAPSHOTS = 2          # per volume; older ones are deleted
MAX_OTHER_SNAPSHOTS = 4          # per volume: timer snapshots and restore undos
# fio's words for a verification failure (as opposed to an I/O error).
MISMATCH = re.compile(r"verify failed|bad magic|bad header|bad pattern|got pattern|"
                      r"verify type mismatch|crc32c: verify", re.IGNORECASE)
FIO_TIMEOUT = 900.0
CLI_TIMEOUT = 120.0


class SoakError(Exception):
    """Set-up failed; the message says what and why."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m`` or ``2h`` in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"duration {text!r}: use a number with s, m or h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_size(text: str) -> int:
    """``128M`` or ``1G`` in bytes (a whole number of MiB, at least 16 MiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*([MG])(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: use a whole number of M or G")
    value = int(m.group(1)) << (20 if m.group(2).upper() == "M" else 30)
    if value < 16 * MiB:
        raise argparse.ArgumentTypeError(f"size {text!r}: at least 16M")
    return value


def file_sha(path: Path) -> str:
    """SHA-256 of a file's content (raises OSError on a read error)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Reference:
    """A snapshot taken right after a completed pass, with its exact bytes."""

    volume: str
    name: str
    gen: int
    sha: str


@dataclass
class Report:
    """Everything counted during the run."""

    ops: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    checks: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    fsck_findings: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    interrupted: Counter = field(default_factory=Counter)
    bytes_written: int = 0
    bytes_verified: int = 0


class Soak:
    """One soak run: the pool, its mount, the workers and what they found."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.pool = work / "pool"
        self.mnt = work / "mnt"
        self.cowfs = str(Path(sys.executable).parent / "cowfs")
        self.rng = random.Random(args.seed)
        self.report = Report()
        self.lock = threading.Lock()
        self.up = threading.Event()          # the mount is live and may be used
        self.pause = threading.Event()       # workers: park at the next pass boundary
        self.stopping = threading.Event()
        self.epoch = 0                       # bumped at every kill
        self.refs: dict[str, list[Reference]] = {}
        self.counter = 0
        self.mounts = 0
        self.workers: list[Worker] = []

    # -- bookkeeping ------------------------------------------------------------

    def fresh(self, prefix: str) -> str:
        """A name never used before in this run."""
        with self.lock:
            self.counter += 1
            return f"{prefix}{self.counter}"

    def count(self, what: str, n: int = 1) -> None:
        """One more operation done."""
        with self.lock:
            self.report.ops[what] += n

    def is_reference(self, ref: Reference) -> bool:
        """Whether ``ref`` is still recorded (not yet deleted as the oldest)."""
        with self.lock:
            return ref in self.refs.get(ref.volume, [])

    def check(self, what: str) -> None:
        """One more verification passed."""
        with self.lock:
            self.report.checks[what] += 1

    def mismatch(self, text: str) -> None:
        """A verification failed: data differs from what was acknowledged."""
        log.error("MISMATCH: %s", text)
        with self.lock:
            self.report.mismatches.append(text)

    def failed(self, what: str, epoch: int, detail: str) -> None:
        """An operation failed: expected if a kill happened meanwhile,
        otherwise recorded as unexpected."""
        if epoch != self.epoch or self.stopping.is_set():
            log.info("%s interrupted by the kill: %s", what, detail.strip()[:200])
            with self.lock:
                self.report.interrupted[what] += 1
        else:
            log.error("UNEXPECTED: %s failed: %s", what, detail.strip()[:2000])
            with self.lock:
                self.report.unexpected.append(f"{what}: {detail.strip()[:500]}")

    # -- commands ---------------------------------------------------------------

    def run(self, cmd: Sequence[str], timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a command with stdin closed; output captured; never raises on
        a non-zero exit (a timeout comes back as exit status -1)."""
        log.debug("$ %s", " ".join(cmd))
        try:
            return subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(list(cmd), -1, "", f"timed out after {e.timeout} s")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``cowfs ARGS``."""
        return self.run([self.cowfs, *args])

    def must(self, cmd: Sequence[str], what: str, timeout: float = CLI_TIMEOUT) -> str:
        """Run a set-up command that has to work; SoakError otherwise."""
        r = self.run(cmd, timeout)
        if r.returncode != 0:
            raise SoakError(f"{what}: {(r.stderr or r.stdout).strip() or r.returncode}")
        return r.stdout

    def attach(self, path: Path, readonly: bool = False) -> str | None:
        """A loop device on ``path`` (None if losetup failed)."""
        cmd = ["losetup", "--direct-io=on", "-f", "--show"] + (["-r"] if readonly else [])
        r = self.run([*cmd, str(path)])
        return r.stdout.strip() if r.returncode == 0 else None

    def detach(self, dev: str) -> None:
        """Detach a loop device and wait until the kernel let go of it."""
        self.run(["losetup", "-d", dev])
        name = os.path.basename(dev)
        deadline = time.monotonic() + 10
        while Path(f"/sys/block/{name}/loop/backing_file").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def fio(self, dev: str, size: int, kind: str, tag: str, gen: int,
            *, verify_only: bool) -> tuple[subprocess.CompletedProcess[str], int, dict]:
        """One fio pass of volume data ``kind`` and pass ``gen`` on ``dev``:
        write everything and verify it, or (``verify_only``) just verify what
        that pass wrote.  Returns the run, the number of mismatch lines in
        its output, and the job's JSON (empty if fio printed none)."""
        cmd = ["fio", f"--name={tag}", f"--filename={dev}", "--rw=randwrite",
               f"--bssplit={BSSPLIT}", f"--size={size}", "--direct=1", "--ioengine=libaio",
               "--iodepth=8", f"--randseed={gen * 7919 + 17}", "--verify_fatal=0",
               "--output-format=json"]
        if kind == "random":
            cmd += ["--verify=crc32c", "--verify_interval=4k"]
        else:
            cmd += ["--verify=pattern", f'--verify_pattern="{tag}g{gen:06d}:"%o']
        cmd += ["--verify_only"] if verify_only else ["--do_verify=1", "--end_fsync=1"]
        r = self.run(cmd, FIO_TIMEOUT)
        bad = sum(1 for line in (r.stdout + r.stderr).splitlines() if MISMATCH.search(line))
        job: dict = {}
        start = r.stdout.find("{")
        if start >= 0:
            try:
                job = json.loads(r.stdout[start:])["jobs"][0]
            except (ValueError, KeyError, IndexError):
                job = {}
        return r, bad, job

    def verify_pass(self, dev: str, volume: str, kind: str, tag: str, gen: int,
                    what: str, epoch: int) -> None:
        """fio's verification of pass ``gen`` on ``dev``: a mismatch is
        recorded as one, an I/O error as a failure."""
        r, bad, job = self.fio(dev, self.args.size, kind, tag, gen, verify_only=True)
        if bad:
            self.mismatch(f"{what}: fio found {bad} bad blocks of pass {gen} of {volume} "
                          f"on {dev}: {r.stderr.strip()[:400]}")
        elif r.returncode != 0 or job.get("error"):
            self.failed(what, epoch, f"fio verify of {volume} on {dev}: exit {r.returncode}, "
                        f"error {job.get('error')}: {r.stderr.strip()[:400]}")
        else:
            self.check(what)
            with self.lock:
                self.report.bytes_verified += job.get("read", {}).get("io_bytes", 0)

    def compare_sha(self, path: Path, ref: Reference, what: str, epoch: int) -> bool:
        """Whether ``path`` holds exactly the reference snapshot's bytes (a
        difference is a mismatch, a read error a failure)."""
        try:
            sha = file_sha(path)
        except OSError as e:
            self.failed(what, epoch, f"reading {path}: {e}")
            return False
        if sha != ref.sha:
            self.mismatch(f"{what}: {path} differs from snapshot {ref.volume}@{ref.name} "
                          f"(pass {ref.gen})")
            return False
        self.check(what)
        return True

    # -- mount, kill, recovery ------------------------------------------------------

    def mount(self) -> None:
        """Mount the pool (the CLI returns once the mount is live)."""
        self.must([self.cowfs, "mount", str(self.pool), str(self.mnt), "--log",
                   str(self.work / "daemon.log")], f"cowfs mount {self.pool}")
        self.mounts += 1
        if not os.path.ismount(self.mnt):
            raise SoakError(f"cowfs mount returned but {self.mnt} is not a mount point")

    def daemon_pid(self) -> int:
        """The daemon serving the pool (from the pool's lock file), checked
        to be a cowfs process so that nothing else is ever signalled."""
        pid = int((self.pool / "lock").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "cowfs" not in cmdline or str(self.pool) not in cmdline:
            raise SoakError(f"pid {pid} in {self.pool}/lock is not this pool's daemon: {cmdline}")
        return pid

    def our_loops(self) -> list[str]:
        """Loop devices backed by files of the mount (volumes, snapshots, clones)."""
        prefix = volume_path(str(self.mnt), "")
        return [loop.path for loop in attached_loops() if loop.backing_file.startswith(prefix)]

    def kill_and_recover(self, mode: str) -> None:
        """SIGKILL the daemon (``under-load`` or ``detached``), clear up,
        fsck, remount and check what must have survived."""
        log.info("=== kill %d (%s) ===", self.report.faults["SIGKILL"] + 1, mode)
        if mode == "detached":
            self.pause.set()
            if not self.wait_parked(FIO_TIMEOUT):
                log.warning("workers did not park in time; killing under load instead")
                mode = "under-load"
        with self.lock:
            self.epoch += 1
            self.report.faults["SIGKILL"] += 1
            self.report.faults[f"SIGKILL {mode}"] += 1
        self.up.clear()
        busy = self.our_loops()
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("killed daemon %d with %d loop devices attached", pid, len(busy))
        self.wait_parked(120)
        for dev in self.our_loops():
            log.info("detaching %s left on the dead mount", dev)
            self.detach(dev)
            self.count("loop detached after the kill")
        self.run(["umount", "-l", str(self.mnt)])
        if os.path.ismount(self.mnt):
            self.run(["fusermount3", "-uz", str(self.mnt)])
        self.fsck("after kill")
        self.mount()
        self.count("remount")
        self.after_kill_checks(mode)
        self.pause.clear()
        self.up.set()

    def wait_parked(self, timeout: float) -> bool:
        """Wait until every worker has parked (loop detached, no fio running)."""
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.ident is None:
                continue   # never started
            if not w.parked.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def fsck(self, when: str) -> None:
        """``cowfs fsck --json`` of the unmounted pool; findings are recorded."""
        r = self.cli("fsck", str(self.pool), "--json")
        self.count("fsck")
        try:
            doc = json.loads(r.stdout)
            findings = [f.get("message", str(f)) for f in doc.get("findings", [])]
        except ValueError:
            findings = [f"unreadable fsck output (exit {r.returncode}): "
                        f"{(r.stdout + r.stderr).strip()[:500]}"]
        if r.returncode != 0 and not findings:
            findings = [f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[:500]}"]
        if findings:
            log.error("fsck %s: %d findings: %s", when, len(findings), findings[:5])
            with self.lock:
                self.report.fsck_findings.extend(f"{when}: {f}" for f in findings)
        else:
            self.check(f"fsck clean ({when})")

    def after_kill_checks(self, mode: str) -> None:
        """What must hold after a kill and remount."""
        epoch = self.epoch
        with self.lock:
            refs = [r for rs in self.refs.values() for r in rs]
        for ref in refs:
            self.compare_sha(self.mnt / ".snapshots" / ref.volume / ref.name, ref,
                             "reference snapshot intact after kill", epoch)
        for w in self.workers:
            path = self.mnt / w.volume
            if mode == "detached" and w.last_gen is not None:
                dev = self.attach(path)
                if dev is None:
                    self.failed("attach after kill", epoch, f"losetup on {path}")
                    continue
                try:
                    self.verify_pass(dev, w.volume, w.kind, w.tag, w.last_gen,
                                     "fsynced pass intact after kill", epoch)
                finally:
                    self.detach(dev)
            else:
                try:
                    file_sha(path)
                    self.check("volume readable after kill")
                except OSError as e:
                    self.failed("volume readable after kill", epoch, f"{path}: {e}")

    # -- set-up and tear-down ------------------------------------------------------

    def setup(self) -> None:
        """mkfs, mount, create the volumes."""
        self.pool.mkdir()
        self.mnt.mkdir()
        self.must([self.cowfs, "mkfs", str(self.pool)], f"cowfs mkfs {self.pool}")
        self.mount()
        for i in range(self.args.volumes):
            volume = f"soak{i}.img"
            with open(self.mnt / volume, "xb") as f:
                f.truncate(self.args.size)
            self.refs[volume] = []
            self.workers.append(Worker(self, i, volume, KINDS[i % len(KINDS)]))
        self.up.set()

    def teardown(self) -> None:
        """Stop everything, check the references a last time, unmount
        cleanly, fsck.  Each step is tried even if an earlier one failed."""
        self.stopping.set()
        self.pause.set()
        self.wait_parked(FIO_TIMEOUT)
        for dev in self.our_loops():
            self.detach(dev)
        if os.path.ismount(self.mnt) and self.up.is_set():
            with self.lock:
                refs = [r for rs in self.refs.values() for r in rs]
            for ref in refs:
                self.compare_sha(self.mnt / ".snapshots" / ref.volume / ref.name, ref,
                                 "reference snapshot intact at the end", self.epoch)
        try:
            pid: int | None = self.daemon_pid()
        except (OSError, ValueError, IndexError, SoakError):
            pid = None
        if os.path.ismount(self.mnt):
            r = self.run(["umount", str(self.mnt)])
            if r.returncode != 0:
                log.error("umount %s: %s", self.mnt, r.stderr.strip())
                self.run(["umount", "-l", str(self.mnt)])
        if pid is not None:
            deadline = time.monotonic() + 60
            while running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.pool.exists():
            self.fsck("at the end")


class Worker(threading.Thread):
    """Writes and verifies one volume pass after pass through a loop device;
    takes reference snapshots and carries out restores between passes."""

    def __init__(self, soak: Soak, index: int, volume: str, kind: str) -> None:
        super().__init__(name=f"worker-{volume}", daemon=True)
        self.soak, self.volume, self.kind = soak, volume, kind
        self.tag = f"v{index}"
        self.rng = random.Random(soak.rng.random())
        self.gen = 0
        self.last_gen: int | None = None     # last pass written and fsynced in full
        self.dev: str | None = None
        self.parked = threading.Event()
        self.restore_to: Reference | None = None

    @property
    def path(self) -> Path:
        """The volume's file in the mount."""
        return self.soak.mnt / self.volume

    def run(self) -> None:
        s = self.soak
        while True:
            if s.stopping.is_set() or s.pause.is_set() or not s.up.is_set():
                self.park()
                if s.stopping.is_set():
                    return
                continue
            epoch = s.epoch
            if self.dev is None:
                self.dev = s.attach(self.path)
                if self.dev is None:
                    s.failed("attach", epoch, f"losetup on {self.path}")
                    time.sleep(1)
                    continue
            if self.restore_to is not None:
                ref, self.restore_to = self.restore_to, None
                self.restore(ref, epoch)
                continue
            self.one_pass(epoch)

    def park(self) -> None:
        """Detach the loop device and wait until the mount may be used again."""
        if self.dev is not None:
            self.soak.detach(self.dev)
            self.dev = None
        self.parked.set()
        s = self.soak
        while not s.stopping.is_set() and (s.pause.is_set() or not s.up.is_set()):
            time.sleep(0.1)
        if not s.stopping.is_set():
            self.parked.clear()

    def one_pass(self, epoch: int) -> None:
        """Write the whole volume with fio and verify it; maybe take a
        reference snapshot."""
        s = self.soak
        assert self.dev is not None
        self.gen += 1
        gen = self.gen
        r, bad, job = s.fio(self.dev, s.args.size, self.kind, self.tag, gen, verify_only=False)
        with s.lock:
            s.report.bytes_written += job.get("write", {}).get("io_bytes", 0)
        if bad:
            s.mismatch(f"pass {gen} of {self.volume}: fio found {bad} bad blocks: "
                       f"{r.stderr.strip()[:400]}")
        if r.returncode != 0 or job.get("error") or bad:
            self.last_gen = None
            if not bad:
                s.failed("fio pass", epoch, f"{self.volume} pass {gen}: exit {r.returncode}, "
                         f"error {job.get('error')}: {r.stderr.strip()[:400]}")
            if epoch != s.epoch and self.dev is not None:
                # The loop device belongs to the dead mount.
                s.detach(self.dev)
                self.dev = None
            return
        self.last_gen = gen
        s.count(f"fio pass ({self.kind})")
        with s.lock:
            s.report.bytes_verified += job.get("read", {}).get("io_bytes", 0)
        if not s.refs[self.volume] or self.rng.random() < 0.3:
            self.reference_snapshot(gen, epoch)

    def reference_snapshot(self, gen: int, epoch: int) -> None:
        """Snapshot the volume right after pass ``gen`` and record its bytes;
        the oldest reference beyond the limit is deleted."""
        s = self.soak
        name = s.fresh(f"ref-{self.tag}-p{gen}-")
        r = s.cli("snapshot", str(s.mnt), name, self.volume)
        if r.returncode != 0:
            s.failed("reference snapshot", epoch, r.stderr)
            return
        s.count("snapshot (reference)")
        try:
            sha = file_sha(s.mnt / ".snapshots" / self.volume / name)
        except OSError as e:
            s.failed("reading a reference snapshot", epoch, str(e))
            return
        with s.lock:
            refs = s.refs[self.volume]
            refs.append(Reference(self.volume, name, gen, sha))
            old = refs.pop(0) if len(refs) > REFERENCE_SNAPSHOTS else None
        if old is not None:
            r = s.cli("delete", str(s.mnt), f"{old.volume}@{old.name}")
            if r.returncode != 0:
                s.failed("delete snapshot", epoch, r.stderr)
            else:
                s.count("snapshot deleted")

    def restore(self, ref: Reference, epoch: int) -> None:
        """Restore the volume to a reference snapshot: detach the loop
        device, restore (``--force`` only if the daemon still finds the
        volume busy), attach again and check the result exactly."""
        s = self.soak
        if not s.is_reference(ref):
            return   # deleted since the request: a newer reference took its place
        if self.dev is not None:
            s.detach(self.dev)
            self.dev = None
        r = s.cli("restore", str(s.mnt), ref.name, self.volume, "--json")
        if r.returncode != 0 and "busy" in (r.stderr + r.stdout).lower():
            log.info("restore of detached %s refused as busy; using --force", self.volume)
            r = s.cli("restore", str(s.mnt), ref.name, self.volume, "--force", "--json")
            forced = True
        else:
            forced = False
        if r.returncode != 0:
            s.failed("restore", epoch, r.stderr or r.stdout)
            self.last_gen = None
            return
        s.count("restore (--force after detaching)" if forced else "restore (detached volume)")
        self.last_gen = ref.gen
        if not s.compare_sha(self.path, ref, "restored volume equals its snapshot", epoch):
            return
        self.dev = s.attach(self.path)
        if self.dev is not None:
            s.verify_pass(self.dev, self.volume, self.kind, self.tag, ref.gen,
                          "restored volume passes fio verification", epoch)


class Controller(threading.Thread):
    """Snapshots, clones, restore requests and clean-up on a timer."""

    def __init__(self, soak: Soak) -> None:
        super().__init__(name="controller", daemon=True)
        self.soak = soak
        self.rng = random.Random(soak.rng.random())

    def run(self) -> None:
        s = self.soak
        actions = [(self.snapshot_all, 3), (self.clone_reference, 2), (self.request_restore, 2),
                   (self.clone_live, 1), (self.cleanup, 2)]
        funcs, weights = zip(*actions)
        while not s.stopping.wait(self.rng.uniform(*s.args.interval)):
            if not s.up.is_set() or s.pause.is_set():
                continue
            self.rng.choices(funcs, weights)[0](s.epoch)

    def snapshot_all(self, epoch: int) -> None:
        """A snapshot of every volume at one instant, in mid-pass."""
        s = self.soak
        r = s.cli("snapshot", str(s.mnt), s.fresh("tick-"))
        if r.returncode != 0:
            s.failed("snapshot of all volumes", epoch, r.stderr)
        else:
            s.count("snapshot (all volumes, under load)")

    def pick_reference(self) -> Reference | None:
        with self.soak.lock:
            refs = [r for rs in self.soak.refs.values() for r in rs]
        return self.rng.choice(refs) if refs else None

    def clone_reference(self, epoch: int) -> None:
        """Clone a reference snapshot; the clone must hold its bytes and
        pass fio's verification through a loop device; then delete it."""
        s = self.soak
        ref = self.pick_reference()
        if ref is None:
            return
        worker = next(w for w in s.workers if w.volume == ref.volume)
        clone = s.fresh("clone-") + ".img"
        r = s.cli("clone", str(s.mnt), f"{ref.volume}@{ref.name}", clone)
        if r.returncode != 0:
            if not s.is_reference(ref):
                # Its worker recorded a newer one and deleted this one meanwhile.
                s.count("clone skipped: reference deleted meanwhile")
                return
            s.failed("clone of a reference snapshot", epoch, r.stderr)
            return
        s.count("clone (of a reference snapshot)")
        path = s.mnt / clone
        if s.compare_sha(path, ref, "clone equals its snapshot", epoch):
            dev = s.attach(path, readonly=True)
            if dev is None:
                s.failed("attach clone", epoch, f"losetup -r {path}")
            else:
                try:
                    s.verify_pass(dev, clone, worker.kind, worker.tag, ref.gen,
                                  "clone passes fio verification", epoch)
                finally:
                    s.detach(dev)
        self.delete_volume(clone, epoch)

    def clone_live(self, epoch: int) -> None:
        """Clone a volume under load; it must read back without error."""
        s = self.soak
        volume = self.rng.choice(s.workers).volume
        clone = s.fresh("live-") + ".img"
        r = s.cli("clone", str(s.mnt), volume, clone)
        if r.returncode != 0:
            s.failed("clone of a live volume", epoch, r.stderr)
            return
        s.count("clone (of a live volume under load)")
        try:
            file_sha(s.mnt / clone)
            s.check("live clone readable")
        except OSError as e:
            s.failed("reading a live clone", epoch, str(e))
        self.delete_volume(clone, epoch)

    def delete_volume(self, name: str, epoch: int) -> None:
        """``rm`` a clone."""
        try:
            os.unlink(self.soak.mnt / name)
            self.soak.count("clone deleted")
        except OSError as e:
            self.soak.failed("delete clone", epoch, str(e))

    def request_restore(self, epoch: int) -> None:
        """Ask a volume's worker to restore it to one of its references."""
        s = self.soak
        ref = self.pick_reference()
        if ref is None:
            return
        worker = next(w for w in s.workers if w.volume == ref.volume)
        if worker.restore_to is None:
            worker.restore_to = ref
            s.count("restore requested")

    def cleanup(self, epoch: int) -> None:
        """Delete the oldest timer and undo snapshots beyond the limit, and
        clones left by an interrupted operation."""
        s = self.soak
        try:
            names = {v: sorted(os.listdir(s.mnt / ".snapshots" / v),
                               key=lambda n, v=v: -self.age(v, n))
                     for v in os.listdir(s.mnt / ".snapshots") if v != "ctl"}
            leftovers = [n for n in os.listdir(s.mnt) if n.startswith(("clone-", "live-"))]
        except OSError as e:
            s.failed("listing snapshots", epoch, str(e))
            return
        for volume, snaps in names.items():
            others = [n for n in snaps if n.startswith(("tick-", "undo-"))]
            doomed = others[:max(0, len(others) - MAX_OTHER_SNAPSHOTS)]
            with s.lock:
                referenced = {r.name for r in s.refs.get(volume, [])}
            # A reference snapshot whose recording a kill cut short: never
            # checked, so of no use (a minute old: not one being recorded now).
            doomed += [n for n in snaps if n.startswith("ref-") and n not in referenced
                       and self.age(volume, n) > 60]
            for name in doomed:
                r = s.cli("delete", str(s.mnt), f"{volume}@{name}")
                if r.returncode != 0:
                    if not (s.mnt / ".snapshots" / volume / name).exists():
                        # A worker retiring its oldest reference deleted it
                        # between our listing and now: nothing left to do.
                        continue
                    s.failed("delete snapshot", epoch, r.stderr)
                    return
                s.count("snapshot deleted")
        for name in leftovers:
            if self.rng.random() < 0.5:
                self.delete_volume(name, epoch)

    def age(self, volume: str, name: str) -> float:
        """Seconds since snapshot ``volume@name`` was taken (its mtime)."""
        try:
            return time.time() - os.stat(self.soak.mnt / ".snapshots" / volume / name).st_mtime
        except OSError:
            return 0.0


def summary(soak: Soak, started: float) -> dict:
    """The final report as a JSON-able dict."""
    rep = soak.report
    return {
        "duration_s": round(time.monotonic() - started),
        "seed": soak.args.seed,
        "volumes": [{"name": w.volume, "kind": w.kind, "passes": w.gen} for w in soak.workers],
        "volume_size": soak.args.size,
        "operations": dict(sorted(rep.ops.items())),
        "bytes_written": rep.bytes_written,
        "bytes_verified": rep.bytes_verified,
        "faults_injected": dict(sorted(rep.faults.items())),
        "checks_passed": dict(sorted(rep.checks.items())),
        "interrupted_by_kills": dict(sorted(rep.interrupted.items())),
        "verify_mismatches": len(rep.mismatches),
        "mismatch_details": rep.mismatches,
        "fsck_findings": rep.fsck_findings,
        "unexpected_errors": rep.unexpected,
        "work_dir": str(soak.work),
    }


def human(doc: dict) -> str:
    """The report for a terminal."""
    lines = [f"cowfs soak: {doc['duration_s']} s, seed {doc['seed']}, "
             f"{len(doc['volumes'])} volumes of {doc['volume_size'] // MiB} MiB "
             f"({', '.join(v['kind'] for v in doc['volumes'])})",
             f"data: {doc['bytes_written'] / MiB:.0f} MiB written, "
             f"{doc['bytes_verified'] / MiB:.0f} MiB verified by fio"]
    for title, key in (("operations", "operations"), ("faults injected", "faults_injected"),
                       ("checks passed", "checks_passed"),
                       ("interrupted by kills (expected)", "interrupted_by_kills")):
        lines.append(f"{title}:")
        lines += [f"  {n:>6}  {what}" for what, n in doc[key].items()] or ["  none"]
    lines.append(f"verify mismatches: {doc['verify_mismatches']}")
    lines += [f"  {m}" for m in doc["mismatch_details"]]
    lines.append(f"fsck findings: {len(doc['fsck_findings'])}")
    lines += [f"  {m}" for m in doc["fsck_findings"][:20]]
    lines.append(f"unexpected errors: {len(doc['unexpected_errors'])}")
    lines += [f"  {m}" for m in doc["unexpected_errors"][:20]]
    ok = not (doc["verify_mismatches"] or doc["fsck_findings"] or doc["unexpected_errors"])
    lines.append("RESULT: " + ("PASS" if ok else "FAIL") + f" (details in {doc['work_dir']})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    p = argparse.ArgumentParser(description="cowfs soak test: fio --verify load, snapshots, "
                                "clones, restores and daemon SIGKILLs")
    p.add_argument("--duration", type=parse_duration, default=parse_duration("30m"),
                   help="how long to run (e.g. 300, 5m, 2h; default 30m)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/cowfs-soak"),
                   help="work directory for the run's pool and logs (default %(default)s)")
    p.add_argument("--volumes", type=int, default=3, help="volumes under load (default 3)")
    p.add_argument("--size", type=parse_size, default=parse_size("128M"),
                   help="size of each volume (default 128M)")
    p.add_argument("--kill-every", type=parse_duration, default=parse_duration("90s"),
                   help="mean time between daemon kills (default 90s)")
    p.add_argument("--interval", type=float, nargs=2, default=(3.0, 8.0), metavar=("MIN", "MAX"),
                   help="seconds between the controller's operations (default 3 8)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--keep", action="store_true", help="keep the pool even if everything passed")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = p.parse_args(argv)
    if args.volumes < 1:
        p.error("--volumes must be at least 1")
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    args.dir = args.dir.resolve()
    return args


def check_prerequisites(args: argparse.Namespace) -> None:
    """Refuse early, with the reason, what would fail half-way."""
    if os.geteuid() != 0:
        raise SoakError("the soak test needs root (it mounts cowfs and attaches loop devices)")
    for tool in ("fio", "losetup", "umount", "fusermount3"):
        if shutil.which(tool) is None:
            raise SoakError(f"command {tool} not found: run `make deps`")
    if not os.access(Path(sys.executable).parent / "cowfs", os.X_OK):
        raise SoakError(f"no cowfs command beside {sys.executable}: run from the project venv")
    args.dir.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(args.dir)
    # Volumes, snapshots holding old passes, clones and copies in flight.
    need = args.size * args.volumes * (REFERENCE_SNAPSHOTS + MAX_OTHER_SNAPSHOTS + 2)
    have = st.f_bavail * st.f_frsize
    if have < need:
        raise SoakError(f"{args.dir} has {have // MiB} MiB free; about {need // MiB} MiB "
                        "needed (use --size or --volumes to ask for less)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; print the report.  Returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(threadName)s %(message)s",
                        stream=sys.stderr)
    try:
        check_prerequisites(args)
    except SoakError as e:
        log.error("%s", e)
        return 1
    work = args.dir / time.strftime("soak-%Y%m%d-%H%M%S")
    work.mkdir()
    logging.getLogger().addHandler(logging.FileHandler(work / "soak.log"))
    log.info("soak seed %d, %s, work directory %s", args.seed, args.duration, work)
    soak = Soak(args, work)
    started = time.monotonic()
    try:
        soak.setup()
        for w in soak.workers:
            w.start()
        Controller(soak).start()
        deadline = started + args.duration
        while True:
            wait = soak.rng.uniform(0.5, 1.5) * args.kill_every
            if time.monotonic() + wait >= deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                break
            time.sleep(wait)
            soak.kill_and_recover(soak.rng.choice(("under-load", "detached")))
    except SoakError as e:
        log.error("%s", e)
        soak.report.unexpected.append(str(e))
    except KeyboardInterrupt:
        log.warning("interrupted; stopping")
        soak.report.unexpected.append("interrupted by the user")
    finally:
        soak.teardown()
    doc = summary(soak, started)
    (work / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(human(doc))
    ok = not (doc["verify_mismatches"] or doc["fsck_findings"] or doc["unexpected_errors"])
    if ok and not args.keep:
        shutil.rmtree(soak.pool, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
