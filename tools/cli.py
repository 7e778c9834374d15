"""The ``cowfs`` command: create pools and mount them.

Subcommands live in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`); a new
one adds an entry there with a function declaring its arguments and a
function running it.

Exit status: 0 on success, 1 when the command was refused or failed (the
reason is printed as ``cowfs: <message>`` on stderr), 2 for usage errors,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cowfs.blockio import OsStorage
from cowfs.errors import PoolError
from cowfs.pool import Pool
from cowfs_daemon.server import MountError, configure_logging, serve, start_in_background

PROG = "cowfs"


class CliError(Exception):
    """A refusal to report to the user as ``cowfs: <message>`` (exit 1)."""


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


SUBCOMMANDS: dict[str, Subcommand] = {
    "mkfs": Subcommand("create a new, empty pool", _mkfs_arguments, _mkfs),
    "mount": Subcommand("mount a pool: its volumes appear as files", _mount_arguments, _mount),
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
    try:
        return args.run(args)
    except (CliError, MountError, PoolError) as err:
        return _fail(str(err))
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        return _fail(f"{where}{err.strerror or err}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
