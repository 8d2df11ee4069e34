"""blueprints/api/client_watch.py: telling a client that hung up from one still waiting."""
import os
import resource
import socket

import pytest

from blueprints.api.client_watch import client_gone


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
