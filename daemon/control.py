"""The ``ctl`` protocol of ``.snapshots/ctl``, ``.clones/ctl`` and
``.pool/ctl``, without FUSE.

One ``write()`` on a ctl file is one command.  :func:`parse` turns the bytes
of a write into a :class:`Command` (or refuses with EINVAL), :func:`execute`
runs it on the pool and returns an :class:`Outcome`: the ``ok <JSON>`` line a
later ``read()`` on the same handle returns, and the :class:`Changes` the FUSE
layer must tell the kernel about (it owns the kernel's caches, this module does
not).  Every refusal is a :class:`~cowfs.errors.PoolError` raised before
anything changed; :func:`error_line` formats it for reading back.

Commands (flags may appear anywhere after the command word; ``--`` ends the
flags, so a later word starting with ``--`` is a name)::

    .snapshots/ctl  snapshot NAME [VOL...] [--dry-run]
                    restore NAME [VOL...] [--force] [--dry-run]
                    delete VOL@NAME
                    rename VOL@OLD NEW
    .clones/ctl     clone SRC NEW [--dry-run]          SRC is VOL or VOL@SNAP
                    clone-group SNAP (--prefix P | --suffix S)... VOL... [--dry-run]
    .pool/ctl       scrub [--rate BYTES_PER_SECOND]    (K, M, G suffixes: powers of 1024)
                    scrub-cancel

A word holding ``@`` is split at its last ``@`` (snapshot names cannot hold
one).  Replies (one line each)::

    ok {"snapshot": NAME, "volumes": [VOL, ...], "dry_run": BOOL}
    ok {"restored": [{"volume", "snapshot", "undo", "size"}, ...], "dry_run": BOOL}
    ok {"volume": VOL, "snapshot": NAME, "freed_bytes": N}          (delete)
    ok {"volume": VOL, "from": OLD, "to": NEW}                      (rename)
    ok {"clones": [{"volume": NEW, "source": "VOL[@SNAP]"}, ...], "dry_run": BOOL}
    ok <ScrubJob.to_json()>                                         (scrub, scrub-cancel)
    error: <command>: <message naming the object and the cause>

``--dry-run`` runs every check the real command runs (restore's EBUSY
check included) and changes nothing.  The clone status files of ``.clones``
and ``.pool/status`` are formatted here too (:func:`clone_status`,
:func:`pool_status`).

The commands of ``.pool/ctl`` are not run by :func:`execute`: a scrub
outlives the write that starts it.  :func:`start_scrub` and
:func:`cancel_scrub` check and prepare them and the FUSE layer runs the
:class:`ScrubJob` in the background, pacing it with :meth:`ScrubJob.pause`.
"""

from __future__ import annotations

import errno
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from cowfs.errors import PoolError
from cowfs.integrity import Scrubber
from cowfs.pool import BLOCK, Pool, VolumeInfo, validate_name

log = logging.getLogger(__name__)

# Longest command accepted in one write, in bytes.  Names are at most 255
# bytes, so this leaves room for a dozen of them; a longer write is refused
# rather than parsed.
MAX_COMMAND_BYTES = 4096


class CtlFile(Enum):
    """Which ctl file a command was written to: each accepts its own verbs."""

    SNAPSHOTS = ".snapshots/ctl"
    CLONES = ".clones/ctl"
    POOL = ".pool/ctl"


@dataclass(frozen=True)
class _Verb:
    """The grammar of one command: its positional words (at least ``min_args``,
    at most ``max_args``, None = no limit), its boolean flags and its flags
    that take a value."""

    usage: str
    min_args: int
    max_args: int | None
    switches: frozenset[str] = frozenset()
    options: frozenset[str] = frozenset()


_VERBS: dict[CtlFile, dict[str, _Verb]] = {
    CtlFile.SNAPSHOTS: {
        "snapshot": _Verb("snapshot NAME [VOL...] [--dry-run]", 1, None,
                          frozenset({"--dry-run"})),
        "restore": _Verb("restore NAME [VOL...] [--force] [--dry-run]", 1, None,
                         frozenset({"--dry-run", "--force"})),
        "delete": _Verb("delete VOL@NAME", 1, 1),
        "rename": _Verb("rename VOL@OLD NEW", 2, 2),
    },
    CtlFile.CLONES: {
        "clone": _Verb("clone SRC NEW [--dry-run]", 2, 2, frozenset({"--dry-run"})),
        "clone-group": _Verb("clone-group SNAP (--prefix P | --suffix S) VOL... [--dry-run]",
                             2, None, frozenset({"--dry-run"}),
                             frozenset({"--prefix", "--suffix"})),
    },
    CtlFile.POOL: {
        "scrub": _Verb("scrub [--rate BYTES_PER_SECOND]", 0, 0, options=frozenset({"--rate"})),
        "scrub-cancel": _Verb("scrub-cancel", 0, 0),
    },
}


@dataclass(frozen=True)
class Command:
    """One parsed command: its verb, positional words, the boolean flags
    given and the values of the valued flags given (names without ``--``)."""

    ctl: CtlFile
    verb: str
    args: tuple[str, ...]
    switches: frozenset[str]
    options: dict[str, str]
    text: str  # the command line as written, for log messages

    @property
    def dry_run(self) -> bool:
        """Whether ``--dry-run`` was given."""
        return "dry-run" in self.switches


@dataclass
class Changes:
    """What a command changed that the kernel may have cached: volumes whose
    data and size were replaced, snapshot entries ``(volume, name)`` that
    disappeared, and whether names in the mount root changed."""

    replaced_volumes: list[int] = field(default_factory=list)
    gone_snapshots: list[tuple[str, str]] = field(default_factory=list)
    root_names: bool = False


@dataclass
class Outcome:
    """The result of a command that succeeded: the line to read back and
    the changes to announce."""

    line: bytes
    changes: Changes


def _refuse(message: str) -> PoolError:
    return PoolError(errno.EINVAL, message)


def decode_command(data: bytes) -> str:
    """The single command line in ``data`` (one trailing newline and blank
    lines dropped).  EINVAL for more than MAX_COMMAND_BYTES, NUL bytes,
    bytes that are not UTF-8, more than one non-blank line or no command."""
    if len(data) > MAX_COMMAND_BYTES:
        raise _refuse(f"command of {len(data)} bytes is longer than the "
                      f"{MAX_COMMAND_BYTES}-byte limit (one command per write)")
    if b"\0" in data:
        raise _refuse("command contains a NUL byte")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _refuse(f"command is not UTF-8 text (byte {err.start} is invalid)") from None
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        raise _refuse("empty command")
    if len(lines) > 1:
        raise _refuse(f"{len(lines)} lines written at once; write one command per write()")
    return lines[0].strip()


def parse(ctl: CtlFile, data: bytes) -> Command:
    """Parse the bytes of one write to ``ctl`` into a Command.

    Refuses with EINVAL (message naming the word and the cause): bad bytes
    (see :func:`decode_command`), unbalanced quotes, an unknown command or
    flag, a flag given twice or without its value, too few or too many
    words.  Names are checked later, by :func:`execute`.
    """
    text = decode_command(data)
    try:
        words = shlex.split(text, posix=True)
    except ValueError as err:
        raise _refuse(f"cannot split {text[:80]!r} into words: {err}") from None
    if not words:
        raise _refuse("empty command")
    verbs = _VERBS[ctl]
    verb = words[0]
    grammar = verbs.get(verb)
    if grammar is None:
        raise _refuse(f"unknown command {verb[:80]!r} for {ctl.value} "
                      f"(known: {', '.join(verbs)})")
    args: list[str] = []
    switches: set[str] = set()
    options: dict[str, str] = {}
    rest = iter(words[1:])
    flags_done = False
    for word in rest:
        if flags_done or not word.startswith("--"):
            args.append(word)
            continue
        if word == "--":
            flags_done = True
            continue
        flag, has_value, value = word.partition("=")
        name = flag[2:]
        if flag in grammar.switches and not has_value:
            if name in switches:
                raise _refuse(f"{verb}: flag {flag} given twice")
            switches.add(name)
        elif flag in grammar.options:
            if not has_value:
                value = next(rest, None)  # type: ignore[assignment]
                if value is None:
                    raise _refuse(f"{verb}: flag {flag} needs a value")
            if name in options:
                raise _refuse(f"{verb}: flag {flag} given twice")
            options[name] = value
        else:
            raise _refuse(f"{verb}: unknown flag {word[:80]!r} (usage: {grammar.usage})")
    if len(args) < grammar.min_args:
        raise _refuse(f"{verb}: missing words (usage: {grammar.usage})")
    if grammar.max_args is not None and len(args) > grammar.max_args:
        extra = args[grammar.max_args]
        raise _refuse(f"{verb}: unexpected word {extra[:80]!r} (usage: {grammar.usage})")
    return Command(ctl, verb, tuple(args), frozenset(switches), options, text)


def split_at(word: str, what: str) -> tuple[str, str]:
    """``VOL@NAME`` split at its last '@' (EINVAL without one)."""
    vol, sep, snap = word.rpartition("@")
    if not sep:
        raise _refuse(f"{word!r} does not name a snapshot: expected {what}")
    return vol, snap


def _volume_names(words: tuple[str, ...], verb: str) -> list[str]:
    for name in words:
        validate_name(name)
    if len(set(words)) != len(words):
        raise _refuse(f"{verb}: a volume is named twice")
    return list(words)


def ok_line(result: dict) -> bytes:
    """The line read back after a command succeeded: ``ok <JSON>``."""
    return b"ok " + json.dumps(result).encode() + b"\n"


def error_line(message: str) -> bytes:
    """The line read back after a command was refused: ``error: <message>``."""
    flat = " ".join(message.split())
    return b"error: " + flat.encode("utf-8", "backslashreplace") + b"\n"


def iso_utc(ns: int) -> str:
    """A time in nanoseconds since the epoch as ISO-8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 1_000_000_000))


def clone_status(pool: Pool, info: VolumeInfo) -> bytes:
    """The content of ``.clones/<volume>`` for a clone: one JSON object and
    a newline, with its source, creation time, size and space figures
    (shared = referenced but also referenced by something else)."""
    origin = info.origin or {}
    referenced, exclusive = pool.space(info.id)
    status = {
        "volume": info.name,
        "source": origin.get("source"),
        "created": iso_utc(origin.get("created", 0)),
        "state": "ready",
        "size": info.size,
        "referenced_bytes": referenced,
        "shared_bytes": max(referenced - exclusive, 0),
        "exclusive_bytes": exclusive,
    }
    return json.dumps(status).encode() + b"\n"


# -- running commands ----------------------------------------------------------


BusyCheck = Callable[[VolumeInfo], bool]
"""Whether a volume has a handle open with write access (restore refuses those)."""


def execute(pool: Pool, command: Command, open_for_writing: BusyCheck) -> Outcome:
    """Run ``command`` on ``pool``; raises PoolError (nothing changed) on refusal.

    ``open_for_writing`` tells whether a volume is open for writing: restore
    refuses such volumes with EBUSY unless ``--force`` is given, and
    ``--dry-run`` reports that conflict too.
    """
    changes = Changes()
    runner = _RUNNERS[command.verb]
    try:
        result = runner(pool, command, open_for_writing, changes)
    except PoolError as err:
        message = str(err)
        if not message.startswith(command.verb + ":"):
            message = f"{command.verb}: {message}"
        raise PoolError(err.errno, message) from None
    return Outcome(ok_line(result), changes)


def _snapshot(pool: Pool, cmd: Command, _busy: BusyCheck, _changes: Changes) -> dict:
    name, *volumes = cmd.args
    validate_name(name, "snapshot")
    taken = pool.snapshot(_volume_names(tuple(volumes), cmd.verb) or None, name,
                          dry_run=cmd.dry_run)
    return {"snapshot": name, "volumes": [s.volume for s in taken], "dry_run": cmd.dry_run}


def _restore(pool: Pool, cmd: Command, open_for_writing: BusyCheck, changes: Changes) -> dict:
    name, *volumes = cmd.args
    validate_name(name, "snapshot")
    targets = _volume_names(tuple(volumes), cmd.verb) or None
    plan = pool.restore(name, targets, dry_run=True)
    infos = [pool.lookup(item["volume"]) for item in plan]
    busy = [info.name for info in infos if open_for_writing(info)]
    if busy and "force" not in cmd.switches:
        raise PoolError(errno.EBUSY, f"volume {busy[0]!r} is open for writing (e.g. attached "
                        "to a loop device); detach it or use --force")
    if busy:
        log.warning("restore %s: forced while %s open for writing; their users now see the "
                    "restored data", name, ", ".join(repr(b) for b in busy))
    if not cmd.dry_run:
        plan = pool.restore(name, targets)
        changes.replaced_volumes.extend(info.id for info in infos)
    return {"restored": plan, "dry_run": cmd.dry_run}


def _delete(pool: Pool, cmd: Command, _busy: BusyCheck, changes: Changes) -> dict:
    vol, name = split_at(cmd.args[0], "VOL@NAME")
    validate_name(vol)
    validate_name(name, "snapshot")
    snap = pool.snapshot_lookup(vol, name)
    _, freed = pool.space(snap.id)
    pool.delete_snapshot(snap.id)
    changes.gone_snapshots.append((vol, name))
    return {"volume": vol, "snapshot": name, "freed_bytes": freed}


def _rename(pool: Pool, cmd: Command, _busy: BusyCheck, changes: Changes) -> dict:
    vol, old = split_at(cmd.args[0], "VOL@OLD")
    new = cmd.args[1]
    validate_name(vol)
    validate_name(old, "snapshot")
    validate_name(new, "snapshot")
    snap = pool.snapshot_lookup(vol, old)
    pool.rename_snapshot(snap.id, new)
    changes.gone_snapshots.append((vol, old))
    return {"volume": vol, "from": old, "to": new}


def _source(word: str) -> tuple[str, str | None]:
    """A clone source ``VOL`` or ``VOL@SNAP`` as (volume, snapshot or None)."""
    vol, sep, snap = word.rpartition("@")
    if not sep:
        validate_name(word)
        return word, None
    validate_name(vol)
    validate_name(snap, "snapshot")
    return vol, snap


def _clone_result(made: list[VolumeInfo], cmd: Command, changes: Changes) -> dict:
    changes.root_names = not cmd.dry_run
    return {"clones": [{"volume": v.name, "source": (v.origin or {}).get("source")}
                       for v in made],
            "dry_run": cmd.dry_run}


def _clone(pool: Pool, cmd: Command, _busy: BusyCheck, changes: Changes) -> dict:
    vol, snap = _source(cmd.args[0])
    new = cmd.args[1]
    validate_name(new)
    return _clone_result(pool.clone([(vol, snap, new)], dry_run=cmd.dry_run), cmd, changes)


def _clone_group(pool: Pool, cmd: Command, _busy: BusyCheck, changes: Changes) -> dict:
    snap, *volumes = cmd.args
    if not cmd.options:
        raise _refuse(f"{cmd.verb}: give --prefix or --suffix (or both) to name the clones")
    validate_name(snap, "snapshot")
    prefix, suffix = cmd.options.get("prefix", ""), cmd.options.get("suffix", "")
    items = [(vol, snap, f"{prefix}{vol}{suffix}")
             for vol in _volume_names(tuple(volumes), cmd.verb)]
    return _clone_result(pool.clone(items, dry_run=cmd.dry_run), cmd, changes)


_RUNNERS: dict[str, Callable[[Pool, Command, BusyCheck, Changes], dict]] = {
    "snapshot": _snapshot,
    "restore": _restore,
    "delete": _delete,
    "rename": _rename,
    "clone": _clone,
    "clone-group": _clone_group,
}


# -- .pool/ctl: scrubs ----------------------------------------------------------

# Block pointers a scrub verifies between two chances for other requests to
# run (about 1 MiB of reads): long enough to amortise the pause, short enough
# that a request waiting behind it is not noticeably delayed.
SCRUB_SLICE_BLOCKS = 256

# With a rate limit, a slice holds at most this many seconds' worth of blocks,
# so the limit is kept smoothly rather than in bursts.
_RATE_QUANTUM = 0.1

_RATE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_rate(text: str) -> int:
    """A scrub rate in bytes per second: a whole number with an optional
    K, M, G or T suffix (powers of 1024; ``50M``, ``50MiB``, ``1g`` and
    ``50M/s`` are all accepted).  EINVAL for anything else or a rate below one
    block per second."""
    word = text.strip().upper().removesuffix("/S").removesuffix("IB").removesuffix("B")
    suffix = word[-1:] if word[-1:] in _RATE_SUFFIXES else ""
    digits = word[:len(word) - len(suffix)]
    if not digits.isdigit():
        raise _refuse(f"scrub: rate {text[:40]!r} is not a number of bytes per second "
                      "(e.g. 52428800, 50M or 1G)")
    rate = int(digits) * _RATE_SUFFIXES[suffix]
    if rate < BLOCK:
        raise _refuse(f"scrub: rate {text[:40]!r} is below one {BLOCK}-byte block per second")
    return rate


class ScrubJob:
    """One scrub of a mounted pool: its :class:`~cowfs.integrity.Scrubber`,
    its rate limit (bytes of volume data verified per second, 4 KiB per
    block; None = as fast as the daemon can while serving requests) and the
    error that stopped it early, if any."""

    def __init__(self, pool: Pool, rate: int | None) -> None:
        self.scrubber = Scrubber(pool)
        self.rate = rate
        self.error: str | None = None

    @property
    def running(self) -> bool:
        """Whether the scrub still has blocks to verify."""
        return not self.scrubber.finished

    def slice_blocks(self) -> int:
        """How many blocks to verify in the next step."""
        if self.rate is None:
            return SCRUB_SLICE_BLOCKS
        return max(1, min(SCRUB_SLICE_BLOCKS, int(self.rate * _RATE_QUANTUM) // BLOCK))

    def pause(self, elapsed: float) -> float:
        """Seconds to wait before the next step, ``elapsed`` seconds after the
        scrub started, so that the blocks verified so far keep to the rate."""
        if self.rate is None:
            return 0.0
        return max(0.0, self.scrubber.blocks_done * BLOCK / self.rate - elapsed)

    def fail(self, message: str) -> None:
        """Stop the scrub because of an error (``message`` names it)."""
        self.error = message
        self.scrubber.cancel()

    def to_json(self) -> dict:
        """The scrubber's report plus ``rate`` (bytes per second or None);
        a scrub stopped by an error has state ``failed`` and its ``error``."""
        doc = self.scrubber.to_json()
        doc["rate"] = self.rate
        if self.error is not None:
            doc["state"] = "failed"
            doc["error"] = self.error
        return doc


def start_scrub(pool: Pool, command: Command, current: ScrubJob | None) -> ScrubJob:
    """The job for a ``scrub`` command, not yet started.  EBUSY while
    ``current`` (the last job) is still running, EINVAL for a bad rate."""
    if current is not None and current.running:
        done, total = current.scrubber.blocks_done, current.scrubber.blocks_total
        raise PoolError(errno.EBUSY, f"scrub: a scrub of pool {pool.label} is already running "
                        f"({done} of {total} blocks checked); wait for it to finish or stop "
                        "it with scrub-cancel")
    rate = parse_rate(command.options["rate"]) if "rate" in command.options else None
    return ScrubJob(pool, rate)


def cancel_scrub(pool: Pool, current: ScrubJob | None) -> ScrubJob:
    """Stop the running scrub ``current`` and return it; ENOENT when none
    is running."""
    if current is None or not current.running:
        raise PoolError(errno.ENOENT, f"scrub-cancel: no scrub is running on pool {pool.label}")
    current.scrubber.cancel()
    return current


def pool_status(pool: Pool, scrub: ScrubJob | None, mounted_ns: int,
                overlapped_reads: int) -> bytes:
    """The content of ``.pool/status``: one JSON object and a newline with the
    pool's directory, its volume and snapshot counts, the checksum and I/O
    errors seen since it was mounted (at ``mounted_ns``), how many reads
    since then found their data on the disk only (not in the host's page
    cache) and how many of those let queued requests start first, its state
    (``serving``; ``reloading`` while a failed operation's half-made change
    waits to be replaced by the durable state; ``read-only`` after lost
    unsynced changes) with the reason, and the current or last scrub (None
    before the first)."""
    try:
        volumes: int | None = len(pool.volumes())
        snapshots: int | None = len(pool.snapshots())
    except PoolError:
        # A pool that cannot reload yet refuses listings; its status
        # matters all the more.
        volumes = snapshots = None
    status = {
        "pool": pool.label,
        "mounted": iso_utc(mounted_ns),
        "volumes": volumes,
        "snapshots": snapshots,
        "checksum_errors": pool.checksum_errors,
        "io_errors": pool.io_errors,
        "reads": {"uncached": pool.uncached_reads, "overlapped": overlapped_reads},
        "state": ("read-only" if pool.degraded else "reloading" if pool.stale
                  else "serving"),
        "reason": pool.degraded or pool.stale,
        "scrub": scrub.to_json() if scrub is not None else None,
    }
    return json.dumps(status).encode() + b"\n"
