"""Notice a client that hung up while the gateway still waits for the upstream's first byte.

Under gunicorn's gevent worker the client's socket is `environ["gunicorn.socket"]`.
The wait runs in a greenlet of its own while this one polls that socket: readable
with nothing to read means the client closed it, and the wait is killed, which
closes the upstream connection it was reading (upstream_http never pools an interrupted one).
"""
import contextvars
import select
import socket

from flask import request

POLL_SECONDS = 0.25


class ClientGone(Exception):
    """The client closed its connection before the first byte."""


def client_socket():
    """The client's socket when served by gevent (None under the test client or threads)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return None
    from gevent import monkey
    return sock if monkey.is_module_patched("socket") else None


def client_gone(sock):
    """True when the client closed its side (a request body was read already). poll, not
    select: a worker with thousands of streams has descriptors past select's 1024."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def wait_for(fn, on_tick=None):
    """fn()'s result; ClientGone (fn killed) if the client leaves first. on_tick() runs
    every POLL_SECONDS of waiting (the relay renews its leases there)."""
    sock = client_socket()
    if sock is None:
        return fn()
    import gevent

    def guarded():  # hand exceptions back as values: gevent would print each one
        try:
            return True, fn()
        except BaseException as err:  # noqa: BLE001
            return False, err

    waiter = gevent.spawn(contextvars.copy_context().run, guarded)
    while not waiter.ready():
        waiter.join(POLL_SECONDS)
        if waiter.ready():
            break
        if on_tick is not None:
            on_tick()
        if client_gone(sock):
            waiter.kill(ClientGone, block=True, timeout=5)
            raise ClientGone()
    ok, value = waiter.get()
    if not ok:
        raise value
    return value
