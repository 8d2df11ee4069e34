"""blueprints/api/upstream_http.py: the pooled upstream client, over real sockets.

A scripted HTTP/1.1 server in a thread answers each request as a test tells it to (keep the
connection, close it, never answer, hang mid-body), and records every connection and request
it saw, so a test can tell a reused connection from a new one. The live tests of the relay
(test_gateway, test_provider_faults...) drive the same client against the fake upstream.
"""
import datetime
import gzip
import ipaddress
import json
import socket
import ssl
import threading
import time

import pytest

from blueprints.api.providers.base import Adaptor, Call, Target, UpstreamFailure
from blueprints.api.providers.openai import OpenAIAdaptor
from blueprints.api.upstream_http import ConnectFailed, UpstreamHTTP
from tests.support import free_port

TIMEOUT = (2, 3)  # (connect, read) seconds


def answer(body=b'{"ok": true}', status="200 OK", headers=()):
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}",
            "Content-Type: application/json", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ScriptedUpstream:
    """`script(number, request)` -> (bytes to send, then): then is "keep" (the connection
    stays open for the next request), "close", "hang" (say nothing more, hold the
    connection) or "silent-close" (close without sending the bytes)."""

    def __init__(self, script, tls=None):
        self.script = script
        self.tls = tls
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.requests = []  # (connection number, request head, body)
        self.connections = 0
        self.hung_up = []  # connection numbers the client closed while we held them
        self.release = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path="/v1/x", host="127.0.0.1"):
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections),
                             daemon=True).start()

    def _serve(self, conn, number):
        try:
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                self.requests.append((number, head.decode("latin-1"), body))
                data, then = self.script(len(self.requests), head.decode("latin-1"))
                if then == "silent-close":
                    return
                conn.sendall(data)
                if then == "close":
                    return
                if then == "hang":
                    conn.settimeout(10)
                    try:
                        if conn.recv(1) == b"":
                            self.hung_up.append(number)
                    except OSError:
                        self.hung_up.append(number)
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    def close(self):
        self.server.close()


@pytest.fixture
def scripted():
    servers = []

    def start(script, tls=None):
        server = ScriptedUpstream(script, tls)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


def adaptor_for(url, client=None, timeout=TIMEOUT):
    target = Target(1, "t", "openai", url, "sk-test-key", "m")
    return Adaptor(target, client or UpstreamHTTP(), timeout)


def wait_until(condition, seconds=3):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


# --- keep-alive ---------------------------------------------------------------------------

def test_requests_to_one_upstream_share_one_kept_alive_connection(scripted):
    server = scripted(lambda n, head: (answer(), "keep"))
    adaptor = adaptor_for(server.url())
    for _ in range(3):
        response = adaptor.http_post(server.url(), b"{}", {"Content-Type": "application/json"})
        assert response.status_code == 200 and response.json() == {"ok": True}
    assert server.connections == 1 and len(server.requests) == 3
    head = server.requests[0][1]
    assert head.startswith("POST /v1/x HTTP/1.1") and "Accept-Encoding: identity" in head


def test_requests_to_the_fake_reuse_their_connection(fake_upstream):
    """Against the real fake (gevent's WSGI server): the second call finds the first's socket."""
    client = UpstreamHTTP()
    target = Target(1, "o", "openai", fake_upstream.url, "sk-up", "gpt-4o-mini")
    adaptor = OpenAIAdaptor(target, client, TIMEOUT)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    call = Call(endpoint="chat", model="gpt-4o-mini", body=body,
                raw_body=json.dumps(body).encode(), content_type="application/json")
    adaptor.send(call)
    [pool] = client._pools.values()
    [first] = pool._idle
    adaptor.send(call)
    assert pool._idle == [first]


def test_an_ip_address_is_connected_to_without_a_lookup(scripted, monkeypatch):
    """gevent's resolver takes a native thread's round trip for every lookup, even of an
    address; a name is still looked up (each new connection, as before)."""
    import gevent.socket
    real, looked_up = gevent.socket.getaddrinfo, []

    def recording(host, *args, **kwargs):
        looked_up.append(host)
        return real(host, *args, **kwargs)
    monkeypatch.setattr(gevent.socket, "getaddrinfo", recording)
    server = scripted(lambda n, head: (answer(), "close"))
    for host in ("127.0.0.1", "localhost"):
        url = server.url(host=host)
        assert adaptor_for(url).http_post(url, b"{}", {}).status_code == 200
    assert looked_up == ["localhost"] and server.connections == 2


def test_a_connection_the_upstream_closed_while_idle_is_not_reused(scripted):
    server = scripted(lambda n, head: (answer(), "close"))  # answers, then closes (FIN)
    adaptor = adaptor_for(server.url())
    adaptor.http_post(server.url(), b"{}", {})
    time.sleep(0.05)  # the FIN arrives while the connection is idle in the pool
    assert adaptor.http_post(server.url(), b"{}", {}).status_code == 200
    assert server.connections == 2 and len(server.requests) == 2  # sent once each


def test_an_idle_connection_closed_as_the_request_went_out_is_retried_once(scripted):
    """The race poll() cannot see: the upstream closes the kept-alive connection on receiving
    the next request. That request goes again, once, on a new connection."""
    server = scripted(lambda n, head: (answer(), "silent-close" if n == 2 else "keep"))
    adaptor = adaptor_for(server.url())
    adaptor.http_post(server.url(), b"{}", {})
    response = adaptor.http_post(server.url(), b'{"second": 1}', {})
    assert response.status_code == 200
    assert [(c, body) for c, _, body in server.requests] == \
        [(1, b"{}"), (1, b'{"second": 1}'), (2, b'{"second": 1}')]


def test_a_new_connection_closed_without_an_answer_fails_cleanly(scripted):
    server = scripted(lambda n, head: (b"", "silent-close"))
    with pytest.raises(UpstreamFailure) as err:
        adaptor_for(server.url()).http_post(server.url(), b"{}", {})
    assert err.value.kind == "connect" and err.value.retryable  # 503 / the next channel
    assert len(server.requests) == 1  # a new connection: no second try


def test_a_half_read_stream_closes_its_connection(scripted):
    stream_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
    first_event = b"data: 1\n\n"

    def script(n, head):
        if n == 1:  # one event, then the stream goes on (we hold it open)
            return stream_head + b"%x\r\n" % len(first_event) + first_event + b"\r\n", "hang"
        return answer(), "keep"
    server = scripted(script)
    adaptor = adaptor_for(server.url())
    response = adaptor.http_post(server.url(), b"{}", {}, stream=True)
    assert next(adaptor.stream_pieces(response)) == first_event  # as it arrived
    response.close()  # the client went away mid-stream
    assert wait_until(lambda: server.hung_up == [1])
    adaptor.http_post(server.url(), b"{}", {})
    assert server.connections == 2  # the half-read connection was not reused


def test_a_stream_read_whole_gives_its_connection_back(scripted):
    events = b"data: 1\n\ndata: [DONE]\n\n"
    server = scripted(lambda n, head: (answer(events), "keep"))
    client = UpstreamHTTP()
    adaptor = adaptor_for(server.url(), client)
    for _ in range(2):
        response = adaptor.http_post(server.url(), b"{}", {}, stream=True)
        assert list(adaptor.sse_events(response)) == [b"data: 1", b"data: [DONE]"]
    assert server.connections == 1


# --- timeouts -----------------------------------------------------------------------------

def test_read_timeout_is_a_timeout_and_connect_timeout_a_connect_failure(scripted):
    server = scripted(lambda n, head: (b"", "hang"))  # never answers
    with pytest.raises(UpstreamFailure) as err:
        adaptor_for(server.url(), timeout=(2, 0.3)).http_post(server.url(), b"{}", {})
    assert err.value.kind == "timeout"  # 504 when no channel answers

    full = socket.socket()  # a listener whose accept queue is full drops new SYNs
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    waiting = []
    for _ in range(3):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        waiting.append(sock)
    try:
        url = f"http://127.0.0.1:{port}/v1/x"
        with pytest.raises(UpstreamFailure) as err:
            adaptor_for(url, timeout=(0.3, 5)).http_post(url, b"{}", {})
        assert err.value.kind == "connect" and "connect timeout" in err.value.message
    finally:
        for sock in waiting + [full]:
            sock.close()


# --- answers we do not take ---------------------------------------------------------------

def test_a_compressed_answer_we_did_not_ask_for_is_a_bad_response(scripted):
    packed = gzip.compress(b'{"ok": true}')
    server = scripted(lambda n, head: (answer(packed, headers=["Content-Encoding: gzip"]),
                                       "keep"))
    with pytest.raises(UpstreamFailure) as err:
        adaptor_for(server.url()).http_post(server.url(), b"{}", {})
    assert err.value.kind == "bad_response"  # 502


def test_garbage_instead_of_http_is_a_bad_response(scripted):
    server = scripted(lambda n, head: (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "close"))
    with pytest.raises(UpstreamFailure) as err:
        adaptor_for(server.url()).http_post(server.url(), b"{}", {})
    assert err.value.kind == "bad_response"


def test_a_header_value_with_a_line_break_is_never_sent(scripted):
    server = scripted(lambda n, head: (answer(), "keep"))
    with pytest.raises(UpstreamFailure) as err:
        adaptor_for(server.url()).http_post(
            server.url(), b"{}", {"Authorization": "Bearer sk-x\r\nX-Injected: 1"})
    assert err.value.kind == "connect" and server.requests == []
    assert "sk-x" not in err.value.message


# --- TLS and proxies ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1 (cert, key paths)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_upstreams_are_verified(scripted, certificate):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = scripted(lambda n, head: (answer(), "keep"), tls=context)
    url = server.url(host="localhost")
    with pytest.raises(UpstreamFailure) as err:  # certifi does not know our own CA
        adaptor_for(url).http_post(url, b"{}", {})
    assert err.value.kind == "connect"
    assert len(server.requests) == 0
    trusting = adaptor_for(url, UpstreamHTTP(ca_bundle=cert))
    assert trusting.http_post(url, b"{}", {}).json() == {"ok": True}
    assert trusting.http_post(url, b"{}", {}).status_code == 200
    assert server.connections == 2  # the refused handshake, then one kept-alive connection


def test_a_ca_bundle_from_the_environment_is_used(monkeypatch, certificate):
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certificate[0])
    assert UpstreamHTTP().ca_bundle == certificate[0]
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    import certifi
    assert UpstreamHTTP().ca_bundle == certifi.where()


def test_an_http_proxy_from_the_environment_is_used_unless_no_proxy(scripted, monkeypatch):
    proxy = scripted(lambda n, head: (answer(), "keep"))
    monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.2")
    for name in ("http_proxy", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = "http://upstream.example:8080/v1/chat/completions?x=1"
    assert adaptor_for(url).http_post(url, b"{}", {}).status_code == 200
    [(_, head, _)] = proxy.requests
    assert head.startswith(f"POST {url} HTTP/1.1")  # a proxy takes the whole URL
    assert "Host: upstream.example:8080" in head
    assert "Proxy-Authorization: Basic dXNlcjpwQHNz" in head  # user:p@ss
    bypassed = f"http://127.0.0.2:{free_port()}/v1/x"  # nobody listens there
    with pytest.raises(UpstreamFailure) as err:  # NO_PROXY: straight to it, refused
        adaptor_for(bypassed).http_post(bypassed, b"{}", {})
    assert err.value.kind == "connect" and len(proxy.requests) == 1


def test_connect_failures_name_their_kind_not_the_address():
    with pytest.raises(ConnectFailed) as err:
        UpstreamHTTP().post("ftp://10.1.2.3/x", b"", {}, TIMEOUT)
    assert "10.1.2.3" not in str(err.value)


def test_each_thread_has_its_own_client_without_gevent_patching():
    """`flask run` serves from threads: a gevent socket pooled by one thread and reused by
    another fails with 'Cannot switch to a different thread'."""
    from blueprints.api.providers import http_client
    mine = http_client()
    assert http_client() is mine
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(http_client()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine
