"""Running cowfs as a service: the systemd notify protocol spoken by the
foreground daemon, the ``mount.cowfs`` helper (called directly, through
``mount -t cowfs`` and through an fstab file), and the unit files.

The ``mount -t cowfs`` tests must not install anything into the host's
/sbin: they run mount(8) in a private mount namespace in which an overlay
on /usr/sbin adds a ``mount.cowfs`` that runs the helper from this
checkout's venv.  The FUSE mount then lives in that namespace only, so each
of those tests is one shell script run inside it.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from cowfs_daemon import server
from cowfs_tools import cli, mount_helper
from helpers_mount import (
    MIB,
    REPO,
    CowfsMount,
    is_mounted,
    read_file,
    run,
    sha256,
    write_file,
)

UNIT = REPO / "systemd" / "cowfs@.service"
EXAMPLE_CONF = REPO / "systemd" / "example.conf"
INSTALLED_COWFS = "/usr/local/bin/cowfs"   # what the unit names; the tests substitute the venv's
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


# ----------------------------------------------------------------------------
# The notify protocol without a mount


@pytest.fixture
def notify_socket(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notify socket: yields the
    ``$NOTIFY_SOCKET`` value (a path, or ``@name`` for an abstract socket
    when the test is parametrized with "abstract") and the bound socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if getattr(request, "param", "path") == "abstract":
        name = f"cowfs-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    try:
        yield address, sock
    finally:
        sock.close()


def receive(sock: socket.socket, timeout: float) -> str | None:
    """The next datagram on ``sock`` as text, or None after ``timeout`` s."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        return None


def fields(message: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a notify message as a dict."""
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
def test_sd_notify_reaches_path_and_abstract_sockets(
        notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    address, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert server.sd_notify("READY=1\nSTATUS=testing")
    assert receive(sock, 5) == "READY=1\nSTATUS=testing"


def test_sd_notify_without_a_service_manager(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert server.sd_notify("READY=1") is False
    # A socket nobody listens on, and an address that is no unix socket:
    # logged, never raised.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert server.sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert server.sd_notify("READY=1") is False
    assert "nobody-listens" in caplog.text and "vsock:2:1234" in caplog.text


# ----------------------------------------------------------------------------
# The notify protocol from a real foreground daemon


def start_foreground(m: CowfsMount, address: str, *extra: str) -> subprocess.Popen[bytes]:
    """``cowfs mount POOL MNT --foreground`` with ``$NOTIFY_SOCKET`` set,
    logging to the mount's log directory."""
    env = dict(os.environ, NOTIFY_SOCKET=address)
    with open(m.logdir / "foreground.log", "ab") as out:
        return subprocess.Popen([m.bin, "mount", m.pool, m.mnt, "--foreground", *extra],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Make sure a daemon started by a test is gone."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.mark.mount
@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
def test_ready_once_the_mount_answers_and_stopping_on_sigterm(
        make_cowfs: Callable[..., CowfsMount], notify_socket: tuple[str, socket.socket]) -> None:
    address, sock = notify_socket
    m = make_cowfs(mount=False)
    proc = start_foreground(m, address)
    try:
        message = receive(sock, 30)
        assert message is not None, "no notify message within 30 s of starting the daemon"
        got = fields(message)
        assert got.get("READY") == "1", f"first message is not READY=1: {message!r}"
        # The moment READY=1 arrives the mount must already answer.
        assert is_mounted(m.mnt), "READY=1 arrived before the mount was in the mount table"
        assert os.listdir(m.mnt) == []
        assert os.stat(m.mnt).st_dev != os.stat(m.mnt.parent).st_dev
        assert str(m.pool) in got.get("STATUS", ""), f"STATUS does not name the pool: {message!r}"
        assert proc.poll() is None

        data = os.urandom(3 * MIB)
        write_file(m.mnt / "vm1.img", data)       # not fsynced: the stop must flush it
        proc.send_signal(signal.SIGTERM)
        message = receive(sock, 30)
        assert message is not None, "no STOPPING=1 within 30 s of SIGTERM"
        assert fields(message).get("STOPPING") == "1", f"expected STOPPING=1, got {message!r}"
        assert proc.wait(60) == 0, (m.logdir / "foreground.log").read_text()
        assert not is_mounted(m.mnt)
        assert receive(sock, 0.2) is None, "more notify messages after STOPPING=1"
    finally:
        stop(proc)
    m.mount()
    assert sha256(read_file(m.mnt / "vm1.img")) == sha256(data)


@pytest.mark.mount
def test_stopping_when_unmounted_from_outside(
        make_cowfs: Callable[..., CowfsMount], notify_socket: tuple[str, socket.socket]) -> None:
    address, sock = notify_socket
    m = make_cowfs(mount=False)
    proc = start_foreground(m, address)
    try:
        ready = receive(sock, 30)
        assert ready is not None and fields(ready).get("READY") == "1", ready
        run(["umount", m.mnt], check=True)
        message = receive(sock, 30)
        assert message is not None and fields(message).get("STOPPING") == "1", message
        assert proc.wait(60) == 0
    finally:
        stop(proc)


@pytest.mark.mount
def test_no_ready_when_the_mount_fails(make_cowfs: Callable[..., CowfsMount],
                                       notify_socket: tuple[str, socket.socket],
                                       tmp_path: Path) -> None:
    address, sock = notify_socket
    m = make_cowfs()                    # the pool is mounted (and locked) already
    other = tmp_path / "other-mnt"
    other.mkdir()
    env = dict(os.environ, NOTIFY_SOCKET=address)
    proc = subprocess.run([m.bin, "mount", m.pool, other, "--foreground"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "already in use" in proc.stderr
    assert receive(sock, 0.5) is None, "a failed mount sent a notify message"
    assert not is_mounted(other)


@pytest.mark.mount
def test_background_daemon_does_not_notify(make_cowfs: Callable[..., CowfsMount],
                                           notify_socket: tuple[str, socket.socket],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The background daemon is not a service's main process; systemd would
    # reject (or, with NotifyAccess=all, misread) its messages.
    address, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    m = make_cowfs()
    m.umount("SIGTERM")
    assert receive(sock, 0.5) is None


# ----------------------------------------------------------------------------
# mount.cowfs


@pytest.mark.parametrize("given, passed", [
    (["defaults,_netdev"], []),
    (["defaults,_netdev,nofail,noauto,auto,user,users,nouser,owner,group,rw"], []),
    (["x-systemd.requires=network-online.target,x-systemd.automount,comment=pool1"], []),
    (["allow_other,_netdev,ro,noatime"], ["allow_other", "ro", "noatime"]),
    (["defaults", "suid,,dev"], ["suid", "dev"]),
])
def test_helper_drops_mount8_options(given: list[str], passed: list[str]) -> None:
    assert mount_helper.cowfs_options(given) == passed


def test_helper_command_line() -> None:
    args = mount_helper.parse_args(["/p", "/m", "-sn", "-o", "defaults,allow_other",
                                    "-oro", "-t", "cowfs", "-v"])
    assert (args.source, args.target, args.options, args.verbose, args.fake) == \
        ("/p", "/m", ["allow_other", "ro"], True, False)
    assert mount_helper.cowfs_argv(args) == ["mount", "-o", "allow_other,ro", "-v", "--",
                                             "/p", "/m"]
    # No options at all: no -o.
    assert mount_helper.cowfs_argv(mount_helper.parse_args(["-p", "/m", "-o", "defaults"])) == \
        ["mount", "--", "-p", "/m"]
    for bad in (["/p"], ["/p", "/m", "/x"], ["/p", "/m", "-o"], ["/p", "/m", "-t", "ext4"],
                ["/p", "/m", "-w"], ["/p", "/m", "-N", "/proc/1/ns/mnt"]):
        with pytest.raises(mount_helper.UsageError):
            mount_helper.parse_args(bad)


def helper(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run mount.cowfs from the venv, isolated as the installed wrapper runs it."""
    return run([VENV_PYTHON, "-I", "-m", "cowfs_tools.mount_helper", *args], timeout=60)


def mount_options(mnt: Path) -> set[str]:
    """Per-mount and per-superblock options of the mount at ``mnt``."""
    target = os.fsencode(os.path.realpath(mnt))
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            left, _, right = line.partition(b" - ")
            if server.unescape_mountinfo(left.split()[4]) == target:
                opts = left.split()[5] + b"," + right.split()[2]
    return set(opts.decode().split(","))


@pytest.mark.mount
def test_helper_mounts_with_fstab_options(make_cowfs: Callable[..., CowfsMount]) -> None:
    m = make_cowfs(mount=False)
    proc = helper(m.pool, m.mnt, "-o",
                  "defaults,_netdev,nofail,x-systemd.requires=foo.service,rw,allow_other,noatime")
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(m.mnt)
    opts = mount_options(m.mnt)
    assert {"rw", "allow_other", "noatime", "default_permissions", "nosuid", "nodev"} <= opts, opts
    assert not {"_netdev", "nofail", "defaults"} & opts
    write_file(m.mnt / "vm1.img", b"x" * 4096, fsync=True)

    # Mounting what is mounted already succeeds without a second daemon
    # (mount -a must be repeatable); another mountpoint is refused (32).
    again = helper(m.pool, m.mnt, "-o", "defaults")
    assert again.returncode == 0 and "already mounted" in again.stderr, again
    other = m.mnt.parent / "other-mnt"
    other.mkdir()
    refused = helper(m.pool, other)
    assert refused.returncode == 32 and "already in use" in refused.stderr, refused
    m.umount()


@pytest.mark.mount
def test_helper_ro_fake_and_errors(make_cowfs: Callable[..., CowfsMount]) -> None:
    m = make_cowfs(mount=False)
    fake = helper(m.pool, m.mnt, "-f", "-v", "-o", "defaults,ro")
    assert fake.returncode == 0 and not is_mounted(m.mnt), fake
    assert "-o ro" in fake.stderr

    bad = helper(m.pool, m.mnt, "-o", "no_such_option")
    assert bad.returncode == 32 and not is_mounted(m.mnt), bad
    assert "no_such_option" in bad.stderr
    usage = helper(m.pool)
    assert usage.returncode == 1 and "usage: mount.cowfs" in usage.stderr

    proc = helper(m.pool, m.mnt, "-o", "ro,_netdev")
    assert proc.returncode == 0, proc.stderr
    assert "ro" in mount_options(m.mnt)
    with pytest.raises(OSError) as err:
        write_file(m.mnt / "vm1.img", b"x")
    assert err.value.errno == errno.EROFS
    m.umount()


NAMESPACE_SCRIPT = r"""
set -u
helperdir=$1; pool=$2; mnt=$3; fstab=$4
# Our mount.cowfs on top of /usr/sbin, for this namespace only.
mount -t overlay overlay -o "lowerdir=$helperdir:/usr/sbin" /usr/sbin || { echo "NO-OVERLAY"; exit 0; }
trap 'umount "$mnt" 2>/dev/null' EXIT
wait_gone() {   # until no daemon holds the pool's lock
  for i in $(seq 100); do
    pid=$(cut -d' ' -f1 "$pool/lock" 2>/dev/null)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}
mount -t cowfs "$pool" "$mnt" -o defaults,_netdev,allow_other; echo "MOUNT-T rc=$?"
grep " $mnt " /proc/self/mountinfo | sed 's/^/MOUNTINFO /'
head -c 1048576 /dev/urandom > "$mnt/vm1.img"
echo "SHA $(sha256sum < "$mnt/vm1.img" | cut -d' ' -f1)"
umount "$mnt"; echo "UMOUNT rc=$?"
wait_gone; echo "GONE rc=$?"
mount -a -T "$fstab"; echo "FSTAB rc=$?"
grep " $mnt " /proc/self/mountinfo | sed 's/^/MOUNTINFO /'
echo "SHA $(sha256sum < "$mnt/vm1.img" | cut -d' ' -f1)"
mount -a -T "$fstab"; echo "FSTAB-AGAIN rc=$?"
grep -c " $mnt " /proc/self/mountinfo | sed 's/^/COUNT /'
umount "$mnt"; echo "UMOUNT rc=$?"
wait_gone; echo "GONE rc=$?"
# The type /proc/mounts shows works too (mount.fuse.cowfs).
mount -t fuse.cowfs "$pool" "$mnt"; echo "MOUNT-FUSE-T rc=$?"
grep " $mnt " /proc/self/mountinfo | sed 's/^/MOUNTINFO /'
umount "$mnt"; echo "UMOUNT rc=$?"
wait_gone; echo "GONE rc=$?"
"""


@pytest.mark.mount
def test_mount_t_cowfs_and_fstab(make_cowfs: Callable[..., CowfsMount], tmp_path: Path) -> None:
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    m = make_cowfs(mount=False)
    helperdir = tmp_path / "helperbin"
    helperdir.mkdir()
    wrapper = helperdir / "mount.cowfs"
    wrapper.write_text("#!/bin/sh\n"
                       f"exec {shlex.quote(str(VENV_PYTHON))} -I -m cowfs_tools.mount_helper \"$@\"\n")
    wrapper.chmod(0o755)
    (helperdir / "mount.fuse.cowfs").symlink_to("mount.cowfs")    # as make install links it
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{m.pool} {m.mnt} cowfs defaults,_netdev,nofail 0 0\n")
    proc = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT,
                "script", helperdir, m.pool, m.mnt, fstab], timeout=120)
    out = proc.stdout
    if "NO-OVERLAY" in out:
        pytest.skip("cannot put an overlay on /usr/sbin in a private mount namespace")
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    results = re.findall(r"^([A-Z-]+) rc=(\d+)$", out, re.M)
    assert results == [("MOUNT-T", "0"), ("UMOUNT", "0"), ("GONE", "0"), ("FSTAB", "0"),
                       ("FSTAB-AGAIN", "0"), ("UMOUNT", "0"), ("GONE", "0"),
                       ("MOUNT-FUSE-T", "0"), ("UMOUNT", "0"), ("GONE", "0")], \
        f"{out}\n{proc.stderr}"
    mountinfo = re.findall(r"^MOUNTINFO (.*)$", out, re.M)
    assert len(mountinfo) == 3 and all(" - fuse.cowfs " in line for line in mountinfo), out
    assert "allow_other" in mountinfo[0] and "_netdev" not in "".join(mountinfo)
    shas = re.findall(r"^SHA (\w+)$", out, re.M)
    assert len(shas) == 2 and shas[0] == shas[1] and len(shas[0]) == 64, out
    assert re.search(r"^COUNT 1$", out, re.M), f"mount -a mounted the pool twice:\n{out}"
    assert not is_mounted(m.mnt)


# ----------------------------------------------------------------------------
# The unit files


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (all sections; comments dropped)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


def example_config() -> dict[str, str]:
    """The KEY=VALUE assignments of systemd/example.conf."""
    pairs = {}
    for line in EXAMPLE_CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_unit_settings() -> None:
    unit = unit_settings(UNIT)
    assert unit["Type"] == ["notify"]
    assert unit["EnvironmentFile"] == ["/etc/cowfs/%i.conf"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillMode"] == ["mixed"]
    assert "remote-fs.target" in " ".join(unit["Before"])
    assert not any(key.startswith(("Protect", "Private")) for key in unit), \
        "mount namespace sandboxing would hide the mount from the host"
    [exec_start] = unit["ExecStart"]
    assert exec_start.split()[:2] == [INSTALLED_COWFS, "mount"] and "--foreground" in exec_start


@pytest.mark.parametrize("options", ["allow_other", "", "ro,allow_other"])
def test_unit_command_line_parses(options: str) -> None:
    # Expand ExecStart the way systemd does with example.conf's settings
    # ("${VAR}" is one word, "$VAR" splits at whitespace) and check that
    # the CLI accepts the result.
    config = dict(example_config(), OPTIONS=options, FLAGS="-v")
    assert {"POOL", "MOUNT", "OPTIONS"} <= set(config)
    [exec_start] = unit_settings(UNIT)["ExecStart"]
    argv: list[str] = []
    for word in exec_start.split():
        braced = re.fullmatch(r"\$\{(\w+)\}", word)
        bare = re.fullmatch(r"\$(\w+)", word)
        if braced:
            argv.append(config.get(braced.group(1), ""))
        elif bare:
            argv.extend(config.get(bare.group(1), "").split())
        else:
            argv.append(word)
    assert argv[0] == INSTALLED_COWFS
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.command, args.pool_dir, args.mountpoint, args.foreground, args.verbose) == \
        ("mount", config["POOL"], config["MOUNT"], True, 1)
    assert [o for group in args.options for o in group.split(",") if o] == \
        [o for o in options.split(",") if o]


def test_units_pass_systemd_analyze_verify(tmp_path: Path, cowfs_bin: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names the installed /usr/local/bin/cowfs, which verify wants
    # to exist; check a copy naming this checkout's cowfs, as make install
    # would write it for BINDIR=<venv>/bin.
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    text = UNIT.read_text()
    assert INSTALLED_COWFS in text
    (unit_dir / UNIT.name).write_text(text.replace(INSTALLED_COWFS, str(cowfs_bin)))
    (unit_dir / "cowfs@pool1.service").symlink_to(UNIT.name)
    for name in (UNIT.name, "cowfs@pool1.service"):
        proc = run([analyze, "verify", unit_dir / name], timeout=120)
        # verify exits 0 on some warnings (an unknown setting, say): any
        # line about our unit counts as a failure.
        complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                      if "cowfs@" in line]
        assert proc.returncode == 0 and not complaints, f"{proc.stdout}{proc.stderr}"


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a unit naming a missing program is refused.
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    broken = tmp_path / UNIT.name
    broken.write_text(UNIT.read_text().replace(INSTALLED_COWFS, str(tmp_path / "no-such-cowfs")))
    proc = run([analyze, "verify", broken], timeout=120)
    assert proc.returncode != 0 and "no-such-cowfs" in proc.stdout + proc.stderr



# ----------------------------------------------------------------------------
# Logging to the journal


@pytest.mark.parametrize("journal", [True, False])
def test_log_lines_carry_priorities_on_the_journal(tmp_path: Path, journal: bool) -> None:
    # configure_logging looks at fd 2: run it in a child whose stderr is a
    # file, and make $JOURNAL_STREAM name that file (as systemd names the
    # journal's socket) or not.
    err_path = tmp_path / "stderr"
    err_path.touch()
    st = err_path.stat()
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}" if journal else "0:0")
    code = ("import logging\n"
            "from cowfs_daemon.server import configure_logging\n"
            "configure_logging(1)\n"
            "log = logging.getLogger('cowfs.test')\n"
            "log.error('e'); log.warning('w'); log.info('i'); log.debug('d')\n")
    with open(err_path, "ab") as err:
        subprocess.run([VENV_PYTHON, "-c", code], env=env, stderr=err, check=True, timeout=60)
    lines = err_path.read_text().splitlines()
    if journal:
        assert lines == ["<3>cowfs.test: e", "<4>cowfs.test: w", "<6>cowfs.test: i",
                         "<7>cowfs.test: d"]
    else:
        assert [re.sub(r"^\S+ \S+ ", "", line) for line in lines] == \
            ["ERROR cowfs.test: e", "WARNING cowfs.test: w", "INFO cowfs.test: i",
             "DEBUG cowfs.test: d"]
