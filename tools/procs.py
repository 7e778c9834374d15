"""Process state as the tools need it."""

from __future__ import annotations


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited.

    A zombie counts as exited: it holds no files, locks or mounts any more,
    and how soon its parent reaps it says nothing about the process (the
    init of the development VM takes 1-2 s to reap an orphan, which showed as
    "the daemon takes 1.3 s to exit after umount")."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
