"""blueprints/api/client_watch.py: telling a client that hung up from one still waiting."""
import os
import resource
import socket
import subprocess
import sys

import pytest

from blueprints.api.client_watch import client_gone
from tests.support import ROOT


@pytest.fixture
def many_descriptors():
    """Push new descriptors past 1024, as a worker serving thousands of streams does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1300, hard), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    yield
    for fd in spare:
        os.close(fd)


def test_a_waiting_client_is_not_gone_even_past_descriptor_1024(many_descriptors):
    """select() refuses descriptors past 1024: the bench's 2,000 streams were answered 499."""
    server, client = socket.socketpair()
    try:
        assert server.fileno() > 1024
        assert client_gone(server) is False
        client.sendall(b"pipelined bytes")  # readable but not closed: still there
        assert client_gone(server) is False
        client.close()
        server.recv(100)
        assert client_gone(server) is True
    finally:
        server.close()


def test_wait_for_in_a_gevent_worker(tmp_path):
    """In a fresh gevent-patched interpreter, as in a served worker: a quick wait runs no
    watcher; a long one has on_tick run every POLL_SECONDS; a client that hangs up
    interrupts the wait (ClientGone) within about one poll, and the wait's own cleanup runs."""
    code = """
from gevent import monkey; monkey.patch_all()
import socket, time
import gevent
from flask import Flask
from blueprints.api.client_watch import POLL_SECONDS, ClientGone, wait_for
app = Flask(__name__)
server, client = socket.socketpair()
ticks, cleaned = [], []
with app.test_request_context(environ_base={"gunicorn.socket": server}):
    assert wait_for(lambda: "quick", lambda: ticks.append(1)) == "quick"
    gevent.sleep(2 * POLL_SECONDS)
    assert ticks == []  # its timer went with it
    assert wait_for(lambda: gevent.sleep(2.2 * POLL_SECONDS) or "slow",
                    lambda: ticks.append(1)) == "slow"
    assert len(ticks) == 2, ticks
    def upstream():
        try:
            gevent.sleep(20)
        finally:
            cleaned.append(True)
    gevent.spawn_later(0.3, client.close)
    started = time.monotonic()
    try:
        wait_for(upstream, lambda: ticks.append(1))
        raise AssertionError("the wait should have been interrupted")
    except ClientGone:
        pass
    assert time.monotonic() - started < 0.3 + 2 * POLL_SECONDS
    assert cleaned == [True]
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
