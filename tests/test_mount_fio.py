"""fio write-and-verify (crc32c) on cowfs volumes, directly on the volume
file and through a loop device, with a re-verification after a remount."""

from __future__ import annotations

import re
import subprocess

import pytest

from helpers_mount import CowfsMount, loop_attach, loop_detach, run

pytestmark = [pytest.mark.mount, pytest.mark.mount_timeout(300)]

VERIFY_ERROR = re.compile(r"verify.*(fail|bad|mismatch)|bad magic|crc32c.*wanted", re.I)


def run_fio(fio: str, target: str, *args: str) -> str:
    """Run one fio job on ``target`` and return its output; assert exit 0, no
    I/O error and no verification failure."""
    cmd = [fio, "--name=cowfs", f"--filename={target}", "--verify=crc32c",
           "--verify_fatal=1", "--verify_state_save=0", "--group_reporting", *args]
    try:
        proc = run(cmd, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fio timed out: {' '.join(cmd)}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fio exited {proc.returncode}: {' '.join(cmd)}\n{output}"
    assert not VERIFY_ERROR.search(output), f"fio reported a verify error:\n{output}"
    errs = re.findall(r"err=\s*(\d+)", output)
    assert errs and all(e == "0" for e in errs), f"fio reported I/O errors:\n{output}"
    return output


def test_fio_randwrite_4k_on_volume_file(mounted: CowfsMount, fio: str) -> None:
    """4 KiB random writes of incompressible data over 128 MiB of a volume
    file, each block then read back and checked (crc32c in every block)."""
    volume = mounted.mnt / "fio.img"
    run(["truncate", "-s", "128M", volume], check=True)
    run_fio(fio, str(volume), "--rw=randwrite", "--bs=4k", "--size=128M", "--ioengine=psync",
            "--fallocate=none", "--do_verify=1", "--end_fsync=1")


@pytest.mark.usefixtures("loop_devices")
def test_fio_mixed_sizes_through_loop(mounted: CowfsMount, fio: str) -> None:
    """Random writes of 4-64 KiB of partly compressible data with O_DIRECT and
    queue depth 8 through a loop device on a 256 MiB volume, verified in the
    same run and, after a full remount of cowfs, verified again from a fresh
    loop device."""
    volume = mounted.mnt / "fio-loop.img"
    run(["truncate", "-s", "256M", volume], check=True)
    job = ["--rw=randwrite", "--bsrange=4k-64k", "--size=256M", "--ioengine=libaio",
           "--iodepth=8", "--direct=1", "--randseed=4242", "--buffer_compress_percentage=60",
           "--buffer_compress_chunk=4k", "--refill_buffers"]
    dev = loop_attach(volume)
    try:
        run_fio(fio, dev, *job, "--do_verify=1")
    finally:
        loop_detach(dev)
    mounted.remount()
    dev = loop_attach(volume)
    try:
        run_fio(fio, dev, *job, "--verify_only")
    finally:
        loop_detach(dev)
