"""``mount.cowfs``: the helper mount(8) runs for file systems of type cowfs.

With it installed as ``/sbin/mount.cowfs`` (``make install`` does that),
``mount -t cowfs POOL_DIR MOUNTPOINT -o OPTS`` and an fstab line such as::

    /var/lib/cowfs/pool1  /mnt/cowfs  cowfs  defaults,_netdev,allow_other  0 0

mount a pool.  mount(8) calls ``mount.cowfs SPEC DIR [-sfinv] [-o OPTS]``;
this runs ``cowfs mount SPEC DIR -o ...`` in the same process, so the mount
is live when the helper returns 0, exactly as with the ``cowfs`` command.

Options that belong to mount(8) or to systemd's fstab generator are dropped
(:data:`MOUNT8_OPTIONS`, anything starting with ``x-`` or ``comment=``); all
others, including ``ro``, ``allow_other``, ``noatime`` and ``suid``, go to the
FUSE mount.  Exit status as mount(8) expects from a helper: 0 mounted (or
the pool was already mounted there, which keeps ``mount -a`` repeatable),
1 bad usage, 32 the mount failed (the reason is on stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from cowfs_daemon.server import serves
from cowfs_tools import cli

PROG = "mount.cowfs"

# Options mount(8), libmount and systemd act on themselves; they mean
# nothing to a FUSE mount (libfuse would refuse most of them).  "rw" is the
# default anyway; "ro" is passed on.
MOUNT8_OPTIONS = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "_netdev", "nofail", "rw", "loud", "silent",
})
MOUNT8_OPTION_PREFIXES = ("x-", "comment=")

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_MOUNT_FAILED = 32

USAGE = f"usage: {PROG} POOL_DIR MOUNTPOINT [-sfinv] [-o OPTIONS] [-t TYPE]"


class UsageError(Exception):
    """The helper was called with arguments it does not understand."""


@dataclass
class HelperArgs:
    """What mount(8) asked for."""

    source: str
    target: str
    options: list[str] = field(default_factory=list)
    fake: bool = False       # -f: do everything but mount
    verbose: bool = False    # -v


def cowfs_options(option_strings: Sequence[str]) -> list[str]:
    """The options of ``option_strings`` (comma-separated, as mount(8)
    gives them) that go to ``cowfs mount -o``, in order: mount(8)'s own
    (:data:`MOUNT8_OPTIONS`, ``x-*``, ``comment=*``) and empty ones are
    dropped."""
    kept = []
    for group in option_strings:
        for option in group.split(","):
            if not option or option in MOUNT8_OPTIONS or option.startswith(MOUNT8_OPTION_PREFIXES):
                continue
            kept.append(option)
    return kept


def parse_args(argv: Sequence[str]) -> HelperArgs:
    """Parse a helper command line the way mount(8) builds it: POOL_DIR and
    MOUNTPOINT first (so either may start with a dash), then the flags
    ``-s`` (sloppy: accepted, cowfs refuses unknown options anyway), ``-f``,
    ``-n`` (no mtab: nothing to do), ``-i`` (no further helpers: there are
    none), ``-v``, ``-o OPTS`` (repeatable) and ``-t TYPE`` (must be cowfs).
    Raises UsageError naming what is wrong."""
    if len(argv) < 2:
        raise UsageError(f"expected POOL_DIR and MOUNTPOINT, got {len(argv)} arguments")
    parsed = HelperArgs(argv[0], argv[1])
    option_strings: list[str] = []
    args = list(argv[2:])
    while args:
        arg = args.pop(0)
        if arg in ("-o", "-t"):
            if not args:
                raise UsageError(f"option {arg} needs a value")
            value = args.pop(0)
            if arg == "-o":
                option_strings.append(value)
            elif value not in ("cowfs", "fuse.cowfs"):
                raise UsageError(f"file system type {value!r} is not cowfs")
        elif arg.startswith("-o") and len(arg) > 2:
            option_strings.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag == "f":
                    parsed.fake = True
                elif flag == "v":
                    parsed.verbose = True
                elif flag == "N":
                    raise UsageError("mounting in another mount namespace (-N) is not supported")
                elif flag not in "sni":
                    raise UsageError(f"unknown flag -{flag}")
        else:
            raise UsageError(f"unexpected argument {arg!r} after POOL_DIR and MOUNTPOINT")
    parsed.options = cowfs_options(option_strings)
    return parsed


def cowfs_argv(args: HelperArgs) -> list[str]:
    """The ``cowfs`` command line that performs the mount ``args`` asks for."""
    argv = ["mount"]
    if args.options:
        argv += ["-o", ",".join(args.options)]
    if args.verbose:
        argv.append("-v")
    # "--": a pool directory or mountpoint may start with a dash.
    return argv + ["--", args.source, args.target]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the helper with ``argv`` (default: sys.argv[1:]) and return
    mount(8)'s exit status."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"{PROG}: {err}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    if serves(args.source, args.target):
        # What `mount -a` expects: libmount cannot tell by itself, because
        # the mount's source reads cowfs:POOL_DIR, not POOL_DIR.
        print(f"{PROG}: pool {args.source} is already mounted on {args.target}", file=sys.stderr)
        return EXIT_OK
    command = cowfs_argv(args)
    if args.fake:
        if args.verbose:
            print(f"{PROG}: would run: cowfs {' '.join(command)}", file=sys.stderr)
        return EXIT_OK
    status = cli.main(command)
    if status == 0:
        return EXIT_OK
    return EXIT_USAGE if status == 2 else EXIT_MOUNT_FAILED


if __name__ == "__main__":
    sys.exit(main())
