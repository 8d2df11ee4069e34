"""Notice a client that hung up while the gateway still waits for the upstream's first byte.

Under gunicorn's gevent worker the client's socket is `environ["gunicorn.socket"]`.
The wait runs in the request's own greenlet. Every POLL_SECONDS of it a watcher greenlet
renews the request's leases and polls that socket: readable with nothing to read means
the client closed it, and the wait is interrupted (ClientGone raised where it blocks),
which closes the upstream connection it was reading (upstream_http never pools an
interrupted one). Most waits end before the first poll: they cost a timer, not a greenlet
and two switches (~30 us a request when each wait had a greenlet of its own).
"""
import contextvars
import select
import socket

from flask import current_app, request

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
    """fn()'s result; ClientGone (fn interrupted) if the client leaves first. on_tick() runs
    every POLL_SECONDS of waiting (the relay renews its leases there)."""
    sock = client_socket()
    if sock is None:
        return fn()
    watch = _Watch(sock, on_tick)
    try:
        result = fn()
    except BaseException:
        if watch.gone:  # whatever fn made of the interruption
            raise ClientGone() from None
        raise
    finally:
        watch.stop()
    if watch.gone:  # fn was done before the interruption could land: nobody to answer
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise ClientGone()
    return result


class _Watch:
    """While the request's greenlet waits: every POLL_SECONDS, a greenlet (spawned then,
    one at a time) runs on_tick and polls the client."""

    def __init__(self, sock, on_tick):
        import gevent
        self.sock, self.on_tick = sock, on_tick
        self.waiting = gevent.getcurrent()
        self.context = contextvars.copy_context()  # the request's, for on_tick
        self.hub = gevent.get_hub()
        self.checker = None
        self.done = self.gone = False
        self.timer = self.hub.loop.timer(POLL_SECONDS, POLL_SECONDS)
        self.timer.start(self._due)

    def stop(self):
        self.done = True  # a check under way sees it and leaves the request alone
        self.timer.stop()
        self.timer.close()

    def _due(self):  # in the hub: must not block
        if not self.done and (self.checker is None or self.checker.dead):
            import gevent
            self.checker = gevent.spawn(self.context.run, self._check)

    def _check(self):
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception:  # noqa: BLE001 - a lease renewal never fails the request
                current_app.logger.exception("renewing the leases of a waiting request failed")
        if not self.done and client_gone(self.sock):
            self.gone = True
            self.hub.loop.run_callback(self._interrupt)

    def _interrupt(self):  # in the hub, as gevent's Timeout raises in a waiting greenlet
        if not self.done:
            self.waiting.throw(ClientGone)
