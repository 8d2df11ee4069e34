"""This process's id without a system call.

`os.getpid()` is a system call every time (glibc stopped caching it), and the hot path asked
for it ~19 times a request: prometheus_client checks for a fork on every metric update, and
the caches, the Redis clients and the group-commit writer key their per-process state by it.
The id is read once and again in every child after a fork, which is the only time it changes.
"""
import os

_pid = os.getpid()


def _forked():
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid():
    """os.getpid(), read once per process."""
    return _pid
