"""cowfs command-line tools (installed as ``cowfs_tools``): the ``cowfs`` CLI
and helper scripts such as the fio benchmark."""
