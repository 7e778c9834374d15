"""The cowfs FUSE layer (installed as ``cowfs_daemon``).

:mod:`cowfs_daemon.fuse_ops` turns file operations on the mount into calls on
an open :class:`cowfs.pool.Pool`; :mod:`cowfs_daemon.server` opens the pool,
mounts it and runs the request loop until the file system is unmounted.
"""
