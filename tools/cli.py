"""The ``cowfs`` command: create, mount and check pools, and manage the
snapshots, restores, clones and scrubs of a mounted pool.

Subcommands live in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`); a new
one adds an entry there with a function declaring its arguments and a
function running it.

The commands on a mounted pool (snapshot, list, delete, rename, restore,
clone, clone-group, scrub, status, df, export, import) talk to the daemon only
through the mount's files (see :mod:`cowfs_tools.mountctl`).  They print
human-readable text by default and one JSON document on stdout with
``--json``.  ``fsck`` opens an unmounted pool itself.

Exit status: 0 on success, 1 when the command was refused or failed (the
reason is printed on stderr as ``cowfs: <object>: <cause>; <what to do>``),
2 for usage errors, 130 when interrupted by Ctrl-C (128 + the signal number
for other signals caught while file systems were frozen or a scrub was
watched).  Two commands report what they found in their status, as e2fsck
does: ``fsck`` exits 0 (clean), 1 (problems found, all fixed), 4 (problems
left), 8 (operational error: no such directory, pool mounted) or 32
(interrupted); ``scrub`` exits 0 (no bad block), 4 (bad blocks found) or 1
(refused, cancelled or failed).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cowfs import integrity
from cowfs.blockio import OsStorage
from cowfs.dataset import validate_name
from cowfs.errors import FormatError, PoolError
from cowfs.pool import BLOCK, Pool
from cowfs_daemon.control import parse_rate
from cowfs_daemon.server import MountError, configure_logging, serve, start_in_background
from cowfs_tools import loopdev, poolcheck
from cowfs_tools.display import human_bytes, iso_utc, local_time, render_table
from cowfs_tools.freeze import FreezeError, check_freezable, frozen
from cowfs_tools.imagecopy import CopyStats, copy_sparse, source_size
from cowfs_tools.loopdev import LoopDevice, LoopError
from cowfs_tools.mountctl import (CLONES_DIR, SNAPSHOTS_DIR, Mount, MountCtlError,
                                  split_source)
from cowfs_tools.progress import Progress
from cowfs_tools.signals import Interrupted, signals_raise

PROG = "cowfs"

log = logging.getLogger("cowfs")


class CliError(Exception):
    """A refusal to report to the user as ``cowfs: <message>`` (exit 1)."""


class UsageError(Exception):
    """Arguments argparse accepts but that do not make sense together
    (reported as ``cowfs: <message>``, exit 2)."""


@dataclass(frozen=True)
class Subcommand:
    """One ``cowfs`` subcommand: its one-line help, a function adding its
    arguments to its parser, and a function running it and returning the
    exit status."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- mkfs ---------------------------------------------------------------------


def _mkfs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool_dir", metavar="POOL_DIR",
                        help="directory to hold the pool (created with mode 0700 if missing)")
    parser.add_argument("--no-compression", action="store_true",
                        help="store data uncompressed (default: lz4)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing pool or a non-empty directory")


def _mkfs(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.pool_dir)
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        if not os.path.isdir(path):
            raise CliError(f"cannot create a pool in {path}: it exists and is not a directory") from None
    except FileNotFoundError:
        raise CliError(f"cannot create pool directory {path}: its parent directory does not exist") from None
    try:
        Pool.mkfs(OsStorage(path), compression=not args.no_compression, force=args.force)
    except BaseException:
        if created:
            # Leave nothing behind but what was there; a directory holding
            # partial pool files stays for inspection.
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise
    if not created and os.stat(path).st_mode & 0o077:
        # Volumes hold whole disks: the pool directory is for its owner only.
        os.chmod(path, 0o700)
        print(f"note: made {path} private (mode 0700)")
    print(f"created pool {path} (compression {'off' if args.no_compression else 'on'})")
    return 0


# -- mount --------------------------------------------------------------------


def _mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool_dir", metavar="POOL_DIR", help="directory holding the pool")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="existing directory to mount on")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="serve in this process until unmounted (default: return once the "
                             "mount is live and serve from a background daemon)")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="comma-separated FUSE mount options, e.g. allow_other,ro (repeatable)")
    parser.add_argument("--log", metavar="FILE",
                        help="append the daemon's log to FILE (default: stderr in the foreground; "
                             "in the background stderr until the mount is live, then nowhere)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="count", default=0,
                       help="log debug messages (twice: also pyfuse3's)")
    noise.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def _mount(args: argparse.Namespace) -> int:
    options = [opt for group in args.options for opt in group.split(",") if opt]
    verbosity = -1 if args.quiet else args.verbose
    log_path = os.path.abspath(args.log) if args.log else None
    if not args.foreground:
        start_in_background(args.pool_dir, args.mountpoint, options=options,
                            verbosity=verbosity, log_path=log_path)
        return 0
    configure_logging(verbosity, log_path)
    return 0 if serve(args.pool_dir, args.mountpoint, options=options) else 1


# -- commands on a mounted pool: shared parts ----------------------------------


def _pool_arguments(parser: argparse.ArgumentParser) -> None:
    """MOUNT first, then --json and -v; every command on a mounted pool has them."""
    parser.add_argument("mount", metavar="MOUNT", help="directory the pool is mounted on")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout (for scripts)")
    parser.add_argument("-v", "--verbose", dest="debug", action="store_true",
                        help="log what is done (flushes, freezes, ctl commands) on stderr")


def _dry_run_argument(parser: argparse.ArgumentParser) -> None:
    """Add --dry-run."""
    parser.add_argument("--dry-run", action="store_true",
                        help="report what would be done, and any conflict; change nothing")


def _open_mount(path: str) -> Mount:
    """The mount at ``path``, or a CliError saying why it is not one."""
    try:
        return Mount(path)
    except MountCtlError as err:
        raise CliError(str(err)) from None


def _check_name(name: str, what: str) -> None:
    """Refuse a bad volume or snapshot name before anything is touched."""
    try:
        validate_name(name, what)
    except PoolError as err:
        raise CliError(f"{err}; choose another name") from None


def _check_volumes(volumes: list[str]) -> None:
    """Check each name of a volume list, and that none is given twice."""
    seen: set[str] = set()
    for volume in volumes:
        _check_name(volume, "volume")
        if volume in seen:
            raise CliError(f"{volume}: named twice; name each volume once")
        seen.add(volume)


def _check_source(source: str) -> tuple[str, str | None]:
    """Split and check ``vol`` or ``vol@snap``."""
    volume, snap = split_source(source)
    _check_name(volume, "volume")
    if snap is not None:
        _check_name(snap, "snapshot")
    return volume, snap


def _advice(err: int, action: str, mount: str, taken: str = "VOL@NAME") -> str:
    """What the operator can do about a refusal ``err`` of ``action``;
    ``taken`` is the snapshot in the way when a snapshot name is taken."""
    if err == errno.ENOENT:
        if action == "snapshot":
            return f"list the volumes with `cowfs status {mount}`"
        return f"list the snapshots with `cowfs list {mount}`"
    if err == errno.EEXIST:
        if action in ("snapshot", "rename"):
            return ("pick another snapshot name, or delete the existing snapshot first with "
                    f"`cowfs delete {shlex.quote(mount)} {shlex.quote(taken)}`")
        return "pick another volume name, or remove the existing volume first"
    if err == errno.ENAMETOOLONG:
        return "names are at most 255 bytes long; choose a shorter one"
    if err == errno.EINVAL:
        return f"see `cowfs {action} -h` for what it takes"
    if err == errno.ENOSPC:
        return (f"free space by deleting snapshots or volumes (`cowfs df {mount}` shows what "
                "each would free)")
    if err == errno.EROFS:
        return "the pool is mounted read-only; mount it read-write to change it"
    if err in (errno.EPERM, errno.EACCES):
        return "run this as root"
    return "the daemon's log has the details"


def _ctl(mount: Mount, directory: str, words: list[str], obj: str, action: str,
         taken: str = "VOL@NAME") -> dict:
    """Send one ctl command; a refusal becomes a CliError naming ``obj``
    with the daemon's cause and advice for ``action`` (see :func:`_advice`
    for ``taken``)."""
    try:
        return mount.command(directory, words)
    except MountCtlError as err:
        if err.errno == errno.ENOTCONN:
            raise CliError(str(err)) from None
        raise CliError(f"{obj}: {_cause(err)}; "
                       f"{_advice(err.errno, action, mount.given, taken)}") from None


_VERBS = ("snapshot", "restore", "delete", "rename", "clone", "clone-group")


def _cause(err: MountCtlError) -> str:
    """The daemon's message without the ``<verb>: `` prefixes it starts with
    (the object named before it already says which command failed)."""
    cause = err.cause
    while (head := cause.partition(": ")[0]) in _VERBS:
        cause = cause[len(head) + 2:]
    return cause


def _emit(args: argparse.Namespace, document: dict, human: list[str]) -> None:
    """Print the result: ``document`` as JSON with --json, else ``human``."""
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(human))


def _command(verb: str, positional: list[str], args: argparse.Namespace,
             switches: Sequence[str] = ("dry_run",), **options: str) -> list[str]:
    """The words of a ctl command: the verb, the flags set in ``args`` (of
    ``switches``) and the non-empty ``options``, then ``--`` so that no
    name is ever taken for a flag, then the positional words."""
    flags = [f"--{name.replace('_', '-')}" for name in switches if getattr(args, name)]
    flags += [f"--{name}={value}" for name, value in options.items() if value]
    return [verb, *flags, "--", *positional]


def _flush_loops(loops: dict[str, list[LoopDevice]]) -> list[LoopDevice]:
    """Flush ``loops`` (see :func:`loopdev.flush`); a failure refuses the command."""
    try:
        return loopdev.flush(loops)
    except LoopError as err:
        raise CliError(f"{err}; nothing was changed") from None


def _loop_words(loops: dict[str, list[LoopDevice]]) -> list[str]:
    """``/dev/loopN (VOL)`` for each device in ``loops``."""
    return [f"{loop.path} ({volume})" for volume, devices in loops.items() for loop in devices]


def _space(n: int | None) -> str:
    """A space figure for a table (``-`` when unknown)."""
    return "-" if n is None else human_bytes(n)


# -- snapshot -------------------------------------------------------------------


def _snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="snapshot name (no '/', no '@')")
    parser.add_argument("volumes", metavar="VOL", nargs="*",
                        help="volumes to snapshot at one instant (default: all volumes)")
    parser.add_argument("--freeze", metavar="FSMOUNT", action="append", default=[],
                        help="fsfreeze the file system mounted at FSMOUNT (on a loop device "
                             "backed by one of the volumes) around the snapshot; repeatable")
    _dry_run_argument(parser)


def _freeze_targets(mount: Mount, fsmounts: list[str], volumes: list[str]) -> list[str]:
    """Resolve and check the --freeze mount points (deduplicated, in order)."""
    refused = {os.stat(mount.path).st_dev: f"it is the cowfs mount {mount.given} itself"}
    pool_dir = mount.pool_dir
    if pool_dir is not None and os.path.isdir(pool_dir):
        refused.setdefault(os.stat(pool_dir).st_dev,
                           f"it holds the pool {pool_dir}: the daemon would hang on its "
                           "own writes and the snapshot could never be taken")
    wanted = {loopdev.volume_path(mount.path, v) for v in volumes}
    targets: list[str] = []
    for fsmount in fsmounts:
        try:
            path = check_freezable(fsmount, refused)
        except FreezeError as err:
            raise CliError(f"{err}; nothing was changed") from None
        if path in targets:
            continue
        loop = loopdev.loop_behind(path)
        if loop is None:
            log.warning("%s is not on a loop device; freezing it does not make the "
                        "snapshot consistent", fsmount)
        elif loop.backing_file not in wanted:
            log.warning("%s is on %s backed by %s, which is not among the volumes "
                        "snapshotted", fsmount, loop.path, loop.backing_file)
        targets.append(path)
    return targets


def _snapshot(args: argparse.Namespace) -> int:
    _check_name(args.name, "snapshot")
    _check_volumes(args.volumes)
    mount = _open_mount(args.mount)
    volumes = args.volumes or mount.volumes()
    if not volumes:
        raise CliError(f"{args.mount}: has no volumes to snapshot; create one first, e.g. "
                       f"`truncate -s 20G {args.mount}/vm1.img`")
    loops = loopdev.loops_for(mount.path, volumes)
    freeze = _freeze_targets(mount, args.freeze, volumes)
    words = _command("snapshot", [args.name, *args.volumes], args)
    obj = f"snapshot {args.name!r}"
    in_the_way = f"{volumes[0] if len(volumes) == 1 else 'VOL'}@{args.name}"
    frozen_for = 0.0
    if args.dry_run:
        reply = _ctl(mount, SNAPSHOTS_DIR, words, obj, "snapshot", in_the_way)
        flushed: list[str] = []
    else:
        # Freeze first: freezing writes the file system out to its loop
        # device, and the flush then pushes that into the volume.
        try:
            started = time.monotonic()
            with frozen(freeze):
                flushed = [loop.path for loop in _flush_loops(loops)]
                reply = _ctl(mount, SNAPSHOTS_DIR, words, obj, "snapshot", in_the_way)
            # Freeze to thaw: how long writers to those file systems waited.
            frozen_for = time.monotonic() - started
        except Interrupted as err:
            thawed = f"{', '.join(freeze)} thawed; " if freeze else ""
            err.note = (f"{thawed}check with `cowfs list {args.mount}` whether snapshot "
                        f"{args.name!r} was taken")
            raise
    taken = reply.get("volumes", volumes)
    document = {"snapshot": args.name, "volumes": taken, "dry_run": args.dry_run,
                "flushed": flushed, "frozen": freeze,
                "frozen_seconds": round(frozen_for, 6) if freeze and not args.dry_run else None}
    if args.dry_run:
        human = [f"would snapshot {', '.join(taken)} as {args.name!r} (dry run: nothing changed)"]
        human += [f"would flush {w}" for w in _loop_words(loops)]
        human += [f"would freeze {f}" for f in freeze]
    else:
        human = [f"snapshot {args.name!r} taken of {', '.join(taken)}"]
        human += [f"  flushed {w}" for w in _loop_words(loops)]
        if freeze:
            human.append(f"  froze {', '.join(freeze)}: writes held for "
                         f"{frozen_for * 1000:.0f} ms")
        where = taken[0] if len(taken) == 1 else "VOL"
        human.append(f"  file{'s' if len(taken) > 1 else ''}: "
                     f"{mount.given}/{SNAPSHOTS_DIR}/{where}/{args.name}")
    _emit(args, document, human)
    return 0


# -- list -----------------------------------------------------------------------


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("volume", metavar="VOL", nargs="?",
                        help="only this volume's snapshots (it may be deleted)")


def _list(args: argparse.Namespace) -> int:
    if args.volume is not None:
        _check_name(args.volume, "volume")
    mount = _open_mount(args.mount)
    existing = set(mount.volumes())
    owners = [args.volume] if args.volume is not None else mount.snapshot_owners()
    snaps = []
    for owner in owners:
        try:
            snaps += mount.snapshots(owner, space=True)
        except MountCtlError as err:
            if err.errno != errno.ENOENT:
                raise CliError(str(err)) from None
            raise CliError(f"{owner}: no such volume, and no snapshots of a volume of "
                           f"that name; list the volumes with `cowfs status {args.mount}`"
                           ) from None
    document = {"snapshots": [
        {**s.to_json(), "created": iso_utc(s.mtime_ns), "created_ns": s.mtime_ns,
         "volume_exists": s.volume in existing} for s in snaps]}
    if not snaps:
        which = f"volume {args.volume}" if args.volume is not None else args.mount
        human = [f"no snapshots of {which}; take one with "
                 f"`cowfs snapshot {args.mount} NAME [VOL...]`"]
    else:
        rows = [[s.volume + ("" if s.volume in existing else " (deleted)"), s.snapshot or "",
                 local_time(s.mtime_ns), human_bytes(s.size), _space(s.referenced),
                 _space(s.exclusive)] for s in snaps]
        human = [render_table(["VOLUME", "SNAPSHOT", "CREATED", "SIZE", "REFERENCED",
                               "EXCLUSIVE"], rows, right=(3, 4, 5))]
    _emit(args, document, human)
    return 0


# -- delete and rename ------------------------------------------------------------


def _snapshot_ref(parser_name: str, ref: str) -> tuple[str, str]:
    """``VOL@SNAP`` -> (VOL, SNAP), or a usage error."""
    volume, snap = split_source(ref)
    if snap is None:
        raise UsageError(f"{parser_name}: {ref!r} does not name a snapshot; write VOL@SNAPSHOT")
    _check_name(volume, "volume")
    _check_name(snap, "snapshot")
    return volume, snap


def _delete_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("snapshot", metavar="VOL@SNAP", help="the snapshot to delete")


def _delete(args: argparse.Namespace) -> int:
    _snapshot_ref("delete", args.snapshot)
    mount = _open_mount(args.mount)
    reply = _ctl(mount, SNAPSHOTS_DIR, _command("delete", [args.snapshot], args, ()),
                 args.snapshot, "delete")
    freed = reply.get("freed_bytes")
    tail = f" (freed {human_bytes(freed)})" if freed is not None else ""
    _emit(args, {"deleted": args.snapshot, "freed": freed},
          [f"deleted snapshot {args.snapshot}{tail}"])
    return 0


def _rename_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("snapshot", metavar="VOL@OLD", help="the snapshot to rename")
    parser.add_argument("new", metavar="NEW", help="its new name (same volume)")


def _rename(args: argparse.Namespace) -> int:
    volume, _ = _snapshot_ref("rename", args.snapshot)
    _check_name(args.new, "snapshot")
    mount = _open_mount(args.mount)
    _ctl(mount, SNAPSHOTS_DIR, _command("rename", [args.snapshot, args.new], args, ()),
         args.snapshot, "rename", f"{volume}@{args.new}")
    _emit(args, {"renamed": args.snapshot, "to": f"{volume}@{args.new}"},
          [f"renamed snapshot {args.snapshot} to {volume}@{args.new}"])
    return 0


# -- restore ----------------------------------------------------------------------


def _restore_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("name", metavar="NAME", help="the snapshot to go back to")
    parser.add_argument("volumes", metavar="VOL", nargs="*",
                        help="volumes to restore at one instant (default: every volume "
                             "that has snapshot NAME)")
    parser.add_argument("--force", action="store_true",
                        help="restore even volumes open for writing (e.g. attached to a "
                             "loop device); their users see the data change under them")
    _dry_run_argument(parser)


def _busy_message(mount: Mount, name: str, volumes: list[str], cause: str,
                  loops: dict[str, list[LoopDevice]], dry_run: bool) -> str:
    """The EBUSY refusal of a restore of ``volumes``, naming what holds
    them: the loop devices attached to them (and where those are mounted),
    or else the volume the daemon found open and how to find its user."""
    held = []
    steps = []
    for volume, devices in loops.items():
        for loop in devices:
            mounted = loopdev.mounted_on(loop)
            where = f", mounted on {', '.join(mounted)}" if mounted else ""
            held.append(f"{volume} is attached to {loop.path}{where}")
            steps += [f"umount {m}" for m in mounted] + [f"losetup -d {loop.path}"]
    # The daemon names the first busy volume it found (quoted); a process
    # rather than a loop device may be what holds it.
    for volume in volumes:
        if repr(volume) in cause and volume not in loops:
            held.append(f"{volume} is open for writing by a process")
            steps.append(f"find it with `fuser -v {mount.given}/{volume}` and stop it")
    if not held:
        held.append(cause)
        steps.append(f"find the process with `fuser -v {mount.given}/VOL` and stop it")
    refused = "dry run: would be refused" if dry_run else "refused"
    return (f"restore {name!r}: {refused}: {'; '.join(held)}; detach first ({'; '.join(steps)}) "
            "and run the restore again, or restore anyway with --force (whoever has the "
            "volume open then sees its data change under it; a file system mounted from it "
            "must be unmounted and checked)")


def _restore(args: argparse.Namespace) -> int:
    _check_name(args.name, "snapshot")
    _check_volumes(args.volumes)
    mount = _open_mount(args.mount)
    volumes = args.volumes or [v for v in mount.volumes()
                               if os.path.exists(mount.snapshot_path(v, args.name))]
    loops = loopdev.loops_for(mount.path, volumes)
    if args.force and not args.dry_run:
        # What the loop devices were told is written belongs in the undo
        # snapshot that keeps the replaced state.
        _flush_loops(loops)
    words = _command("restore", [args.name, *args.volumes], args, ("force", "dry_run"))
    try:
        reply = mount.command(SNAPSHOTS_DIR, words)
    except MountCtlError as err:
        if err.errno == errno.EBUSY:
            cause = _cause(err)
            raise CliError(_busy_message(mount, args.name, volumes, cause, loops,
                                         args.dry_run)) from None
        if err.errno == errno.ENOTCONN:
            raise CliError(str(err)) from None
        raise CliError(f"restore {args.name!r}: {_cause(err)}; "
                       f"{_advice(err.errno, 'restore', args.mount)}") from None
    restored = reply.get("restored", [])
    warnings = []
    if not args.dry_run:
        for item in restored:
            for loop in loops.get(item["volume"], []):
                # The device's own cache still holds the old bytes.
                loopdev.drop_cache(loop)
                mounted = loopdev.mounted_on(loop)
                if mounted:
                    warnings.append(f"{item['volume']} is attached to {loop.path} and mounted "
                                    f"on {', '.join(mounted)}: that file system still "
                                    "believes the old contents; unmount it and run fsck "
                                    "before using it again")
                    log.warning("%s", warnings[-1])
    verb = "would restore" if args.dry_run else "restored"
    human = [f"{verb} {item['volume']} to snapshot {item['snapshot']} "
             f"(size {human_bytes(item['size'])}); its current state "
             f"{'would be' if args.dry_run else 'is'} kept as snapshot "
             f"{item['volume']}@{item['undo']}" for item in restored]
    if args.dry_run:
        human.append("dry run: nothing changed")
    elif restored:
        undo: dict[str, list[str]] = {}
        for item in restored:
            undo.setdefault(item["undo"], []).append(item["volume"])
        human += [f"to undo: cowfs restore {shlex.quote(args.mount)} {shlex.quote(u)} "
                  f"{shlex.join(vols)}" for u, vols in undo.items()]
    _emit(args, {"restored": restored, "dry_run": args.dry_run, "warnings": warnings}, human)
    return 0


# -- clone ------------------------------------------------------------------------


def _clone_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("source", metavar="SRC",
                        help="VOL@SNAP, or VOL to clone the live volume")
    parser.add_argument("new", metavar="NEW", help="name of the new volume")
    _dry_run_argument(parser)


def _clone_lines(clones: list[dict], mount: Mount, dry_run: bool,
                 loops: dict[str, list[LoopDevice]] | None = None) -> list[str]:
    """Human output of clone and clone-group (``loops``: devices flushed)."""
    verb = "would clone" if dry_run else "cloned"
    lines = [f"{verb} {c['source']} into {mount.given}/{c['volume']}" for c in clones]
    verb = "would flush" if dry_run else "  flushed"
    lines += [f"{verb} {word}" for word in _loop_words(loops or {})]
    if dry_run:
        lines.append("dry run: nothing changed")
    return lines


def _clone(args: argparse.Namespace) -> int:
    volume, snap = _check_source(args.source)
    _check_name(args.new, "volume")
    mount = _open_mount(args.mount)
    loops = loopdev.loops_for(mount.path, [volume]) if snap is None else {}
    flushed = [] if args.dry_run else [loop.path for loop in _flush_loops(loops)]
    reply = _ctl(mount, CLONES_DIR, _command("clone", [args.source, args.new], args),
                 f"clone {args.source} -> {args.new}", "clone")
    clones = reply.get("clones", [{"volume": args.new, "source": args.source}])
    _emit(args, {"clones": clones, "dry_run": args.dry_run, "flushed": flushed},
          _clone_lines(clones, mount, args.dry_run, loops))
    return 0


def _clone_group_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("snapshot", metavar="SNAP", help="snapshot name each VOL has")
    parser.add_argument("volumes", metavar="VOL", nargs="+", help="volumes to clone")
    parser.add_argument("--prefix", default="", help="new name = PREFIX + VOL + SUFFIX")
    parser.add_argument("--suffix", default="", help="new name = PREFIX + VOL + SUFFIX")
    _dry_run_argument(parser)


def _clone_group(args: argparse.Namespace) -> int:
    if not args.prefix and not args.suffix:
        raise UsageError("clone-group: give --prefix or --suffix (or both): the clones "
                         "need names different from their volumes")
    _check_name(args.snapshot, "snapshot")
    _check_volumes(args.volumes)
    for volume in args.volumes:
        _check_name(args.prefix + volume + args.suffix, "volume")
    mount = _open_mount(args.mount)
    words = _command("clone-group", [args.snapshot, *args.volumes], args,
                     prefix=args.prefix, suffix=args.suffix)
    reply = _ctl(mount, CLONES_DIR, words, f"clone-group {args.snapshot!r}", "clone-group")
    clones = reply.get("clones", [])
    _emit(args, {"clones": clones, "dry_run": args.dry_run},
          _clone_lines(clones, mount, args.dry_run))
    return 0


# -- status and df ----------------------------------------------------------------


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("volume", metavar="VOL", nargs="?",
                        help="show this volume in detail: lineage, clones, snapshots, loops")


def _lineage(mount: Mount, origin: str | None) -> list[str]:
    """The chain of sources a clone descends from, nearest first; a source
    whose volume is gone ends it."""
    chain: list[str] = []
    while origin is not None and origin not in chain:
        chain.append(origin)
        try:
            origin = mount.dataset(split_source(origin)[0]).origin
        except MountCtlError:
            break
    return chain


def _snapshot_count(mount: Mount, volume: str) -> int:
    """How many snapshots ``volume`` has (0 if it has no snapshot directory)."""
    try:
        return len(mount.snapshot_names(volume))
    except MountCtlError:
        return 0


def _loop_json(loop: LoopDevice) -> dict:
    """A loop device and where its file systems are mounted, for JSON."""
    return {"device": loop.path, "mounted_on": loopdev.mounted_on(loop)}


def _status_volume(args: argparse.Namespace, mount: Mount) -> int:
    _check_name(args.volume, "volume")
    try:
        vol = mount.dataset(args.volume, space=True)
    except MountCtlError as err:
        raise CliError(f"{err}; list the volumes with `cowfs status {args.mount}`") from None
    names = mount.volumes()
    clones = []
    for other in names:
        origin = mount.dataset(other).origin if other != args.volume else None
        if origin is not None and split_source(origin)[0] == args.volume:
            clones.append({"volume": other, "source": origin})
    snaps = mount.snapshots(args.volume)
    attached = loopdev.loops_for(mount.path, [args.volume]).get(args.volume, [])
    loops = [_loop_json(loop) for loop in attached]
    status = mount.clone_status(args.volume)
    document = {**vol.to_json(), "lineage": _lineage(mount, vol.origin), "clone": status,
                "clones": clones, "snapshots": [s.snapshot for s in snaps], "loops": loops}
    rows = [["volume", vol.volume], ["file", mount.volume_path(vol.volume)],
            ["size", human_bytes(vol.size)],
            ["referenced", f"{_space(vol.referenced)}  (data its blocks hold)"],
            ["exclusive", f"{_space(vol.exclusive)}  (freed if it were deleted)"]]
    if vol.origin is not None:
        rows.append(["origin", vol.origin + (f", cloned {status['created']}" if status else "")])
        rows.append(["lineage", " <- ".join([vol.volume, *document["lineage"]])])
        if status and "shared_bytes" in status:
            rows.append(["shared", f"{human_bytes(status['shared_bytes'])}  (with its "
                                   "source and other clones)"])
    rows.append(["clones", ", ".join(f"{c['volume']} (from {c['source']})" for c in clones)
                 or "none"])
    rows.append(["snapshots", (f"{len(snaps)}, newest {snaps[-1].snapshot} "
                               f"({local_time(snaps[-1].mtime_ns)}); "
                               f"`cowfs list {args.mount} {args.volume}`") if snaps else "none"])
    rows.append(["loop", ", ".join(
        loop["device"] + (f" (mounted on {', '.join(loop['mounted_on'])})"
                          if loop["mounted_on"] else "")
        for loop in loops) or "not attached"])
    _emit(args, document, [f"{k + ':':<12}{v}" for k, v in rows])
    return 0


def _status(args: argparse.Namespace) -> int:
    mount = _open_mount(args.mount)
    if args.volume is not None:
        return _status_volume(args, mount)
    names = mount.volumes()
    loops = loopdev.loops_for(mount.path, names)
    volumes = []
    for name in names:
        try:
            vol = mount.dataset(name, space=True)
        except MountCtlError as err:
            if err.errno == errno.ENOENT:
                continue        # deleted while we looked
            raise CliError(str(err)) from None
        volumes.append({**vol.to_json(), "snapshots": _snapshot_count(mount, name),
                        "loops": [_loop_json(loop) for loop in loops.get(name, [])]})
    gone = [{"volume": owner, "snapshots": _snapshot_count(mount, owner)}
            for owner in mount.snapshot_owners() if owner not in set(names)]
    health = _pool_health(mount)
    document = {"mount": mount.path, "pool": mount.pool_dir, "volumes": volumes,
                "deleted_volumes_with_snapshots": gone, **health}
    human = [f"pool {mount.pool_dir} mounted on {mount.path}: {len(volumes)} volume(s)"]
    human += _health_lines(health)
    if volumes:
        rows = [[v["name"], human_bytes(v["size"]), _space(v["referenced"]),
                 _space(v["exclusive"]), str(v["snapshots"]), v["origin"] or "-",
                 ", ".join(loop["device"] for loop in v["loops"]) or "-"] for v in volumes]
        human.append(render_table(["VOLUME", "SIZE", "REFERENCED", "EXCLUSIVE", "SNAPSHOTS",
                                   "ORIGIN", "LOOP"], rows, right=(1, 2, 3, 4)))
    for g in gone:
        human.append(f"deleted volume {g['volume']} still has {g['snapshots']} snapshot(s); "
                     f"clone one to get it back: `cowfs clone {args.mount} "
                     f"{g['volume']}@SNAP NEW`")
    _emit(args, document, human)
    return 0


def _pool_health(mount: Mount) -> dict:
    """From ``.pool/status``: ``errors`` (checksum and I/O errors since the
    mount), ``state`` and ``reason`` (see ``.pool/status``) and ``scrub``
    (the current or last scrub, or None).  All None when the daemon has no
    ``.pool`` directory."""
    try:
        status = poolcheck.pool_status(mount)
    except MountCtlError as err:
        if err.errno != errno.ENOTSUP:
            raise CliError(str(err)) from None
        return {"errors": None, "state": None, "reason": None, "scrub": None}
    return {"errors": {"checksum": status["checksum_errors"], "io": status["io_errors"],
                       "since": status["mounted"]},
            "state": status["state"], "reason": status["reason"], "scrub": status["scrub"]}


def _health_lines(health: dict) -> list[str]:
    """``cowfs status`` lines on the pool's health (see :func:`_pool_health`)."""
    errors = health["errors"]
    if errors is None:
        return ["errors:   unknown (this daemon predates error counters; remount to get them)"]
    lines = []
    if health["state"] == "read-only":
        lines.append(f"state:    READ-ONLY: {health['reason']}; writes fail with EROFS and "
                     "fsync with EIO: unmount and mount the pool again")
    elif health["state"] == "reloading":
        lines.append(f"state:    RELOADING after a failed operation ({health['reason']}); "
                     "requests fail with EIO until the disk under the pool answers again")
    else:
        lines.append("state:    serving")
    lines.append(f"errors:   {errors['checksum']} checksum, {errors['io']} I/O "
                 f"(since mounted at {errors['since']})")
    scrub = health["scrub"]
    lines.append(f"scrub:    {poolcheck.scrub_summary(scrub)}")
    if scrub is not None and scrub["bad_blocks"]:
        lines.append(poolcheck.findings_table(scrub["bad_blocks"]))
    return lines


def _df(args: argparse.Namespace) -> int:
    mount = _open_mount(args.mount)
    st = mount.statvfs()
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = total - st.f_bfree * st.f_frsize
    names = mount.volumes()
    datasets = []
    for owner in sorted(set(names) | set(mount.snapshot_owners())):
        if owner in names:
            try:
                datasets.append(("volume", mount.dataset(owner, space=True)))
            except MountCtlError as err:
                if err.errno != errno.ENOENT:
                    raise CliError(str(err)) from None
        try:
            snaps = mount.snapshots(owner, space=True)
        except MountCtlError:
            snaps = []
        kind = "snapshot" if owner in names else "snapshot (volume deleted)"
        datasets += [(kind, s) for s in snaps]
    document = {"pool": {"dir": mount.pool_dir, "mount": mount.path, "total": total,
                         "used": used, "free": free},
                "datasets": [{**d.to_json(), "type": kind} for kind, d in datasets]}
    percent = f"{used * 100 / total:.0f}%" if total else "-"
    human = [f"pool {mount.pool_dir} on {mount.path}: {human_bytes(total)} total, "
             f"{human_bytes(used)} used ({percent}), {human_bytes(free)} free"]
    if datasets:
        rows = [[d.label, kind, human_bytes(d.size), _space(d.referenced), _space(d.exclusive)]
                for kind, d in datasets]
        human.append(render_table(["NAME", "TYPE", "SIZE", "REFERENCED", "EXCLUSIVE"], rows,
                                  right=(2, 3, 4)))
        human.append("REFERENCED counts blocks shared with other volumes and snapshots; "
                     "EXCLUSIVE is what deleting that one alone would free.")
    _emit(args, document, human)
    return 0


# -- export and import --------------------------------------------------------------


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("source", metavar="VOL[@SNAP]", help="volume or snapshot to export")
    parser.add_argument("file", metavar="FILE", help="raw image file to write (sparse)")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def _copy_report(args: argparse.Namespace, what: str, stats: CopyStats, seconds: float,
                 document: dict) -> None:
    """Print the outcome of an export or import (``document`` gets the figures)."""
    rate = stats.size / seconds if seconds > 0 else 0
    document.update(size=stats.size, data_bytes=stats.written, seconds=round(seconds, 3))
    _emit(args, document, [f"{what}: {human_bytes(stats.size)}, {human_bytes(stats.written)} "
                           f"of it data (the rest left as holes), in {seconds:.1f} s "
                           f"({human_bytes(int(rate))}/s)"])


def _export(args: argparse.Namespace) -> int:
    volume, snap = _check_source(args.source)
    mount = _open_mount(args.mount)
    try:
        mount.dataset(args.source)
    except MountCtlError as err:
        raise CliError(f"{err}; see `cowfs status {args.mount}` and "
                       f"`cowfs list {args.mount}`") from None
    if snap is None:
        loops = loopdev.loops_for(mount.path, [volume])
        _flush_loops(loops)
        for word in _loop_words(loops):
            log.warning("%s is attached to %s and may change while it is copied; for a "
                        "consistent image snapshot it and export %s@SNAP", volume, word, volume)
    target = os.path.abspath(args.file)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if args.force else os.O_EXCL)
    if args.force and os.path.exists(target) and not os.path.isfile(target):
        raise CliError(f"{args.file}: not a regular file; export writes a sparse image file")
    try:
        src = os.open(mount.dataset_path(args.source), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise CliError(f"{args.source}: cannot open it: {err.strerror}") from None
    try:
        try:
            dst = os.open(target, flags, 0o600)
        except FileExistsError:
            raise CliError(f"{args.file}: already exists; choose another file name or add "
                           "--force to overwrite it") from None
        except OSError as err:
            raise CliError(f"{args.file}: cannot create it: {err.strerror}") from None
        started = time.monotonic()
        size = os.fstat(src).st_size
        try:
            with signals_raise(), Progress(f"exporting {args.source}", size,
                                           enabled=not args.json) as progress:
                stats = copy_sparse(src, dst, size, progress)
        except BaseException as err:
            os.close(dst)
            # A partial image is worse than none: it looks like a good one.
            os.unlink(target)
            if isinstance(err, OSError):
                raise CliError(f"export of {args.source} to {args.file}: {err.strerror or err}; "
                               "the partial file was removed") from None
            if isinstance(err, Interrupted):
                err.note = f"the partial file {args.file} was removed"
            raise
        os.close(dst)
    finally:
        os.close(src)
    _copy_report(args, f"exported {args.source} to {target}", stats,
                 time.monotonic() - started, {"source": args.source, "file": target})
    return 0


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("file", metavar="FILE", help="raw image file or block device to read")
    parser.add_argument("volume", metavar="VOL", help="name of the new volume")


def _import(args: argparse.Namespace) -> int:
    _check_name(args.volume, "volume")
    mount = _open_mount(args.mount)
    try:
        src = os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise CliError(f"{args.file}: cannot open it: {err.strerror}") from None
    try:
        try:
            size = source_size(src)
        except ValueError as err:
            raise CliError(f"{args.file}: {err}; import reads a raw image file or a block "
                           "device") from None
        target = mount.volume_path(args.volume)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise CliError(f"{args.volume}: a volume of that name already exists; import "
                           f"under another name, or remove it first (rm {target})") from None
        except OSError as err:
            raise CliError(f"{args.volume}: cannot create the volume: {err.strerror}; "
                           f"{_advice(err.errno or 0, 'import', args.mount)}") from None
        started = time.monotonic()
        try:
            with signals_raise(), Progress(f"importing {os.path.basename(args.file)}", size,
                                           enabled=not args.json) as progress:
                stats = copy_sparse(src, dst, size, progress)
        except BaseException as err:
            os.close(dst)
            # Half a disk image must not pass for the whole one.
            os.unlink(target)
            if isinstance(err, OSError):
                raise CliError(f"import of {args.file} into {args.volume}: "
                               f"{err.strerror or err}; the partial volume was removed; "
                               f"{_advice(err.errno or 0, 'import', args.mount)}") from None
            if isinstance(err, Interrupted):
                err.note = f"the partial volume {args.volume} was removed"
            raise
        os.close(dst)
    finally:
        os.close(src)
    _copy_report(args, f"imported {args.file} as volume {args.volume}", stats,
                 time.monotonic() - started, {"file": os.path.abspath(args.file),
                                              "volume": args.volume})
    return 0


# -- fsck ---------------------------------------------------------------------------

# e2fsck's exit codes for what the report does not decide itself (it
# gives 0 clean, 1 all fixed and 4 problems left).
FSCK_LEFT = 4
FSCK_OPERATIONAL = 8
FSCK_CANCELLED = 32


def _fsck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool_dir", metavar="POOL_DIR", help="directory holding the pool "
                        "(it must not be mounted)")
    parser.add_argument("--repair", action="store_true",
                        help="fix what can be fixed safely (leaked space, wrong reference "
                             "counts) and report what could not be fixed")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON on stdout (for scripts)")
    parser.add_argument("-v", "--verbose", dest="debug", action="store_true",
                        help="log what is checked on stderr")


def _fsck_failed(args: argparse.Namespace, path: str, message: str) -> int:
    """Report an operational error of fsck (exit 8): nothing was checked."""
    if args.json:
        print(json.dumps({"pool": path, "exit_code": FSCK_OPERATIONAL, "error": message},
                         indent=2))
    print(f"{PROG}: fsck: {message}", file=sys.stderr)
    return FSCK_OPERATIONAL


def _fsck_unopenable(args: argparse.Namespace, path: str, err: FormatError) -> int:
    """Report a pool that cannot be opened at all (exit 4): one finding."""
    finding = {"kind": "unreadable", "object": path, "offset": None, "message": str(err),
               "fixed": False}
    document = {"pool": path, "clean": False, "exit_code": FSCK_LEFT, "nodes_checked": 0,
                "blocks_checked": 0, "findings": [finding]}
    _emit(args, document, [
        f"fsck of pool {path}: the pool cannot be opened: {err}",
        "nothing else could be checked, and --repair cannot fix this: it needs a valid "
        "superblock and checkpoint; restore the pool directory from a backup",
        f"pool {path}: 1 problem left"])
    return FSCK_LEFT


def _fsck_busy_message(path: str, err: PoolError) -> str:
    """The refusal of fsck on a pool in use, naming where it is mounted."""
    places = poolcheck.mountpoints_of(path)
    if not places:
        return f"{err} (EBUSY); fsck checks only pools that are not in use"
    place = shlex.quote(places[0])
    return (f"pool {path} is mounted on {', '.join(places)} (EBUSY: in use); fsck checks "
            f"only unmounted pools: unmount it first (`umount {place}`), or verify its "
            f"data while it stays mounted with `cowfs scrub {place}`")


def _fsck(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.pool_dir)
    if not args.debug:
        # The report lists every finding; the checker's own log lines would
        # only repeat them on stderr.
        logging.getLogger(integrity.__name__).setLevel(logging.CRITICAL)
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        return _fsck_failed(args, path, f"{path} {what}; give the directory of a pool")
    try:
        report = integrity.fsck(OsStorage(path), repair=args.repair)
    except FormatError as err:
        return _fsck_unopenable(args, path, err)
    except PoolError as err:
        if err.errno == errno.EBUSY:
            return _fsck_failed(args, path, _fsck_busy_message(path, err))
        return _fsck_failed(args, path, f"{err} ({err.errname})")
    except OSError as err:
        return _fsck_failed(args, path, f"{err.filename or path}: {err.strerror or err}")
    except KeyboardInterrupt:
        print(f"{PROG}: fsck of {path} interrupted before it finished; run it again",
              file=sys.stderr)
        return FSCK_CANCELLED
    document = {"pool": path, **report.to_json()}
    findings = document["findings"]
    left = [f for f in findings if not f["fixed"]]
    human = [f"fsck of pool {path}: {report.nodes_checked} tree nodes and "
             f"{report.blocks_checked} blocks checked"]
    if findings:
        human.append(poolcheck.findings_table(findings, repair=args.repair))
    if not findings:
        human.append(f"pool {path} is clean")
    elif not left:
        human.append(f"pool {path}: {len(findings)} problem(s) found, all fixed")
    else:
        human.append(f"pool {path}: {len(left)} problem(s) left"
                     + (f", {len(findings) - len(left)} fixed" if len(left) < len(findings)
                        else ""))
        damaged = [f for f in left if f["kind"] in ("bad-block", "bad-node")]
        if not args.repair and len(damaged) < len(left):
            human.append(f"`cowfs fsck --repair {shlex.quote(path)}` fixes what can be fixed "
                         "safely (leaked space, reference counts) and says what it cannot")
        if damaged:
            human.append("damaged blocks and tree nodes cannot be repaired: reading them "
                         "returns EIO; restore the volumes and snapshots named above from "
                         "a backup")
    _emit(args, document, human)
    return report.exit_code()


# -- scrub ---------------------------------------------------------------------------

SCRUB_BAD_BLOCKS = 4
SCRUB_POLL_INTERVAL = 0.2   # seconds between two looks at .pool/status


def _scrub_arguments(parser: argparse.ArgumentParser) -> None:
    _pool_arguments(parser)
    parser.add_argument("--rate", metavar="BYTES",
                        help="verify at most BYTES of volume data per second (K, M, G "
                             "suffixes are powers of 1024, e.g. 50M); default: as fast as "
                             "the daemon can while it keeps serving requests")
    parser.add_argument("--cancel", action="store_true",
                        help="stop the scrub that is running and report what it found")


def _pool_ctl(mount: Mount, words: list[str]) -> dict:
    """Send one ``.pool/ctl`` command; a refusal becomes a CliError."""
    try:
        return mount.command(poolcheck.POOL_DIR, words)
    except MountCtlError as err:
        if err.errno == errno.ENOTCONN:
            raise CliError(str(err)) from None
        quoted = shlex.quote(mount.given)
        cause = err.cause.removeprefix(f"{words[0]}: ")
        if err.errno == errno.EBUSY:
            advice = (f"follow it with `cowfs status {quoted}` or stop it with "
                      f"`cowfs scrub --cancel {quoted}`")
        elif err.errno == errno.ENOENT:
            advice = f"start one with `cowfs scrub {quoted}`"
        elif err.errno == errno.ENOTSUP:
            advice = "unmount the pool and mount it again with this version"
        else:
            advice = _advice(err.errno, "scrub", mount.given)
        raise CliError(f"{mount.given}: {cause}; {advice}") from None


def _watch_scrub(mount: Mount, started: dict, show: bool) -> dict:
    """Poll ``.pool/status`` until the scrub ``started`` (the reply that
    started it) ends; draw a progress bar if ``show``.  Interrupted by a
    signal, it cancels the scrub."""
    pool = mount.pool_dir or mount.given
    with signals_raise(), Progress(f"scrubbing {pool}", started["blocks_total"] * BLOCK,
                                   enabled=show) as progress:
        try:
            while True:
                try:
                    scrub = poolcheck.pool_status(mount)["scrub"]
                except MountCtlError as err:
                    raise CliError(str(err)) from None
                if scrub is None or scrub["started_ns"] != started["started_ns"]:
                    raise CliError(f"{mount.given}: the scrub started was replaced by "
                                   "another one (was the pool remounted?); see "
                                   f"`cowfs status {shlex.quote(mount.given)}`")
                progress.advance(scrub["blocks_checked"] * BLOCK - progress.done)
                if scrub["state"] != "running":
                    return scrub
                time.sleep(SCRUB_POLL_INTERVAL)
        except Interrupted as err:
            try:
                mount.command(poolcheck.POOL_DIR, ["scrub-cancel"])
                err.note = "the scrub was cancelled"
            except MountCtlError:
                err.note = (f"the scrub may still be running; see "
                            f"`cowfs status {shlex.quote(mount.given)}`")
            raise


def _scrub_report(mount: Mount, scrub: dict) -> list[str]:
    """Human lines on a finished, cancelled or failed scrub."""
    pool = mount.pool_dir or mount.given
    done = scrub["blocks_checked"]
    seconds = max((scrub["finished_ns"] - scrub["started_ns"]) / 1e9, 1e-3)
    bad = scrub["bad_blocks"]
    state = {"finished": "", "cancelled": " (cancelled before the end)",
             "failed": f" (failed: {scrub.get('error')})"}.get(scrub["state"], "")
    lines = [f"scrub of pool {pool} on {mount.given}{state}: {done} of {scrub['blocks_total']} "
             f"blocks ({human_bytes(done * BLOCK)}) checked in {seconds:.1f} s "
             f"({human_bytes(int(done * BLOCK / seconds))}/s): "
             + (f"{len(bad)} bad block{'s' if len(bad) != 1 else ''}" if bad else "no errors")]
    if bad:
        lines.append(poolcheck.findings_table(bad))
        lines.append("reading those blocks returns EIO; restore the data at those offsets "
                     "from a backup (a snapshot sharing a bad block is damaged too)")
    return lines


def _scrub(args: argparse.Namespace) -> int:
    rate: int | None = None
    if args.rate is not None:
        if args.cancel:
            raise UsageError("scrub: --rate and --cancel do not go together")
        try:
            rate = parse_rate(args.rate)
        except PoolError as err:
            raise UsageError(str(err)) from None
    mount = _open_mount(args.mount)
    try:
        status = poolcheck.pool_status(mount)
    except MountCtlError as err:
        raise CliError(str(err)) from None
    if args.cancel:
        scrub = _pool_ctl(mount, ["scrub-cancel"])
    else:
        started = _pool_ctl(mount, ["scrub", f"--rate={rate}"] if rate else ["scrub"])
        scrub = _watch_scrub(mount, started, show=not args.json)
    _emit(args, {"mount": mount.path, "pool": status["pool"], "scrub": scrub},
          _scrub_report(mount, scrub))
    if scrub["bad_blocks"]:
        return SCRUB_BAD_BLOCKS
    if scrub["state"] != "finished" and not args.cancel:
        return 1
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "mkfs": Subcommand("create a new, empty pool", _mkfs_arguments, _mkfs),
    "mount": Subcommand("mount a pool: its volumes appear as files", _mount_arguments, _mount),
    "fsck": Subcommand("check an unmounted pool offline (and repair what is safe)",
                       _fsck_arguments, _fsck),
    "snapshot": Subcommand("snapshot volumes at one instant (flushing their loop devices)",
                           _snapshot_arguments, _snapshot),
    "list": Subcommand("list snapshots", _list_arguments, _list),
    "delete": Subcommand("delete a snapshot", _delete_arguments, _delete),
    "rename": Subcommand("rename a snapshot", _rename_arguments, _rename),
    "restore": Subcommand("bring volumes back to a snapshot (the replaced state is kept)",
                          _restore_arguments, _restore),
    "clone": Subcommand("make a thin, writable copy of a snapshot or volume",
                        _clone_arguments, _clone),
    "clone-group": Subcommand("clone several volumes' snapshots at one instant",
                              _clone_group_arguments, _clone_group),
    "status": Subcommand("show volumes, clone lineage, space, loop devices, error "
                         "counters and the last scrub", _status_arguments, _status),
    "scrub": Subcommand("verify the checksum of every block of a mounted pool",
                        _scrub_arguments, _scrub),
    "df": Subcommand("show pool space and each volume's and snapshot's share",
                     _pool_arguments, _df),
    "export": Subcommand("copy a volume or snapshot to a sparse raw image file",
                         _export_arguments, _export),
    "import": Subcommand("create a volume from a raw image file or block device",
                         _import_arguments, _import),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand in :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="cowfs: block volumes as files in a copy-on-write pool, served over FUSE",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sub in SUBCOMMANDS.items():
        sub_parser = commands.add_parser(name, help=sub.help, description=sub.help)
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(run=sub.run)
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cowfs`` command line with ``argv`` (default: sys.argv[1:])
    and return the exit status."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "debug"):
        # Commands on a mounted pool: warnings always, progress notes with -v.
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                            format=f"{PROG}: %(levelname)s: %(message)s", force=True)
    try:
        return args.run(args)
    except UsageError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except (CliError, MountError, PoolError, MountCtlError, LoopError, FreezeError) as err:
        return _fail(str(err))
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        return _fail(f"{where}{err.strerror or err}")
    except Interrupted as err:
        _fail(str(err))
        return 128 + err.signum
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
