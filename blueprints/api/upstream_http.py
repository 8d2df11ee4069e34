"""The worker's HTTP client for upstream calls: keep-alive connections pooled per upstream
origin, on gevent sockets and geventhttpclient's C parser (llhttp).

Chosen by measurement (issue 12, one gevent worker relaying to a fast fake): `requests` added
+1.57 ms p50 and served 862 req/s at 50 connections, urllib3 +0.95 ms / 1,329 req/s,
geventhttpclient +0.62 ms / 2,634 req/s. Its own HTTPClient makes request 257 to a host wait
for a free connection, never retries a POST on a keep-alive connection the upstream closed,
and raises the same error for a connect timeout as for a read timeout; so this module uses its
parts (the connection factory: DNS, connect timeout, TLS, proxy tunnel; and the response
parser) and keeps the pool and the request itself here.

Kept from requests: connect vs read timeouts; TLS verified against certifi's CA bundle, or
REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE; HTTP(S)_PROXY / ALL_PROXY / NO_PROXY from the
environment. Answers are asked uncompressed (Accept-Encoding: identity): nothing to decode,
and the size cap counts the bytes that arrive.
"""
import base64
import ipaddress
import json
import os
import select
import socket
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import certifi
from gevent import monkey
from geventhttpclient.connectionpool import ConnectionPool, SSLConnectionPool
from geventhttpclient.response import (
    HTTPConnectionClosed, HTTPParseError, HTTPSocketPoolResponse,
)

PIECE = 64 * 1024  # the most bytes one read takes from a socket
IDLE_PER_ORIGIN = 256  # idle keep-alive connections kept per upstream origin (as requests did)
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
# The kernel's poll, even under gevent: gevent's turns the event loop for a zero-timeout look
# (23 µs against 0.3 µs, measured here), on every request that reuses a connection.
_kernel_poll = monkey.get_original("select", "poll")
USER_AGENT = "TokenOpen"


class TransportError(Exception):
    """The HTTP exchange failed. The text names the failure, never the upstream's address."""


class ConnectFailed(TransportError):
    """No connection: refused, unresolvable, TLS refused, proxy refused, or too slow."""

    def __init__(self, message, timed_out=False):
        super().__init__(message)
        self.timed_out = timed_out


class ReadTimeout(TransportError):
    """The upstream sent nothing for longer than the read timeout."""


class ConnectionBroken(TransportError):
    """The connection closed or broke before the answer was complete."""


class MalformedAnswer(TransportError):
    """What came back is not HTTP."""


class UpstreamResponse(HTTPSocketPoolResponse):
    """One upstream answer; its headers are read when it is made, its body on demand.

    The connection goes back to the pool the moment the body has been read to its end;
    `close()` before that closes the connection (a half-read one is never reused).
    """

    content = None  # the whole body, once read_capped (base.py) has read it

    @property
    def status_code(self):
        return self.get_code()

    def header(self, name, default=None):
        """One header's value (repeated headers joined by ", "), whatever its case."""
        value = self.get(name)
        if value is None:
            return default
        return ", ".join(value) if isinstance(value, list) else value

    def read_some(self):
        """The body bytes that have arrived, waiting for some; b"" once the body has ended."""
        while not self._body_buffer and not self.message_complete:
            sock = self._sock
            if sock is None:
                raise ConnectionBroken("the connection was closed")
            try:
                data = sock.recv(self.block_size)
                self.feed(data)  # b"" tells the parser the upstream closed its side
            except TimeoutError:
                self.release()
                raise ReadTimeout("the upstream went quiet past the read timeout") from None
            except HTTPParseError:  # cut short, or chunk framing that is not HTTP
                self.release()
                raise ConnectionBroken("the upstream's answer broke off") from None
            except OSError as err:
                self.release()
                raise ConnectionBroken(type(err).__name__) from None
            except BaseException:  # a killed greenlet: the half-read connection is dropped
                self.release()
                raise
            if not data and not self.message_complete:
                self.release()
                raise ConnectionBroken("the upstream closed the connection mid-answer")
        piece = bytes(self._body_buffer)  # where the parser (geventhttpclient) puts body bytes
        self._body_buffer.clear()
        return piece

    def pieces(self):
        """The body's byte pieces as they arrive."""
        while piece := self.read_some():
            yield piece

    @property
    def text(self):
        """The body read whole, as text."""
        return (self.content or b"").decode("utf-8", "replace")

    def json(self):
        """The body read whole, parsed (ValueError when it is not JSON)."""
        return json.loads(self.content or b"")

    def close(self):
        """Hand the connection back when the body was read whole, else close it."""
        self.release()


class _KeepAlive:
    """Idle keep-alive connections to one origin, on one of geventhttpclient's connection
    factories (plain or TLS).

    A busy origin gets another connection rather than a wait, as requests' pool did, and at
    most IDLE_PER_ORIGIN idle ones are kept. An idle connection is checked with poll() before
    reuse: readable means the upstream closed it (select() refuses descriptors past 1024, and
    a worker with 2,000 streams has them).
    """

    def __init__(self, *args, proxy=None, **kwargs):
        if proxy is not None:
            kwargs.update(use_proxy=True, proxy_user=proxy.user, proxy_password=proxy.password)
        super().__init__(*args, size=IDLE_PER_ORIGIN, **kwargs)
        self.proxy = proxy
        self._idle = []

    def checkout(self, fresh=False):
        """(socket, reused): a live idle connection (unless `fresh`), else a new one
        (ConnectFailed)."""
        while self._idle and not fresh:
            sock = self._idle.pop()
            if _idle_and_open(sock):
                return sock, True
            _close(sock)
        try:
            return self._create_socket(), False
        except TimeoutError:
            raise ConnectFailed("connect timeout", timed_out=True) from None
        except (OSError, RuntimeError) as err:  # RuntimeError: the proxy refused the tunnel
            raise ConnectFailed(type(err).__name__) from err

    def _resolve(self):
        """An IP address needs no lookup. gevent's resolver hands every getaddrinfo to a native
        thread and back, even for a literal: 2,000 of them when a burst of streams opens
        2,000 connections at once (3% of the worker's samples)."""
        try:
            address = ipaddress.ip_address(self._connection_host)
        except ValueError:
            return super()._resolve()
        if getattr(address, "scope_id", None):  # fe80::1%eth0: the OS knows the interface
            return super()._resolve()
        if address.version == 6:
            return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                     (str(address), self._connection_port, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (str(address), self._connection_port))]

    def return_socket(self, sock):
        """Called by the response once its body was read whole."""
        if len(self._idle) < IDLE_PER_ORIGIN and not self._closed:
            self._idle.append(sock)
        else:
            _close(sock)

    def release_socket(self, sock):
        """Called for a connection that must not be reused."""
        _close(sock)

    def close(self):
        self._closed = True
        idle, self._idle = self._idle, []
        for sock in idle:
            _close(sock)


class _Pool(_KeepAlive, ConnectionPool):
    pass


class _TLSPool(_KeepAlive, SSLConnectionPool):
    pass


def _idle_and_open(sock):
    try:
        if sock.fileno() < 0:
            return False
        poller = _kernel_poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


class UpstreamHTTP:
    """The worker's one client for every upstream call (blueprints.api.providers.http_client).

    `post(url, body, headers, timeout)` answers an UpstreamResponse whose headers have arrived,
    or raises a TransportError.
    """

    def __init__(self, ca_bundle=None):
        self.ca_bundle = ca_bundle or next(
            (os.environ[name] for name in CA_BUNDLE_VARIABLES if os.environ.get(name)),
            certifi.where())
        self._pools = {}  # (scheme, host, port, connect timeout) -> _Pool

    def post(self, url, body, headers, timeout):
        """POST `body` (bytes) with `headers`; timeout is (connect seconds, read seconds)."""
        scheme, host, port, target = _split(url)
        connect_timeout, read_timeout = timeout
        key = (scheme, host, port, connect_timeout)
        pool = self._pools.get(key) or self._new_pool(key)
        request = _request_head(pool, scheme, host, port, target, headers, len(body)) + body
        for attempt in (1, 2):
            sock, reused = pool.checkout(fresh=attempt == 2)
            try:
                sock.settimeout(read_timeout)
                try:
                    sock.sendall(request)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the upstream may have answered (and closed) before reading it all
                return UpstreamResponse(sock, pool, block_size=PIECE, method="POST")
            except HTTPConnectionClosed:  # closed (or reset) before a single byte came back
                if reused and attempt == 1:
                    continue  # the upstream closed an idle connection as we sent on it: once more
                raise ConnectionBroken("the upstream closed the connection without answering") \
                    from None
            except TimeoutError:
                pool.release_socket(sock)
                raise ReadTimeout("the upstream did not answer in time") from None
            except HTTPParseError:
                pool.release_socket(sock)
                raise MalformedAnswer("the upstream's answer is not HTTP") from None
            except OSError as err:
                pool.release_socket(sock)
                raise ConnectionBroken(type(err).__name__) from None
            except BaseException:  # a killed greenlet: nothing goes back to the pool
                pool.release_socket(sock)
                raise

    def _new_pool(self, key):
        scheme, host, port, connect_timeout = key
        proxy = _proxy_for(scheme, host)
        options = dict(connection_timeout=connect_timeout, network_timeout=connect_timeout,
                       proxy=proxy)
        connect_to = (proxy.host, proxy.port) if proxy is not None else (host, port)
        if scheme == "https":
            pool = _TLSPool(*connect_to, host, port, ssl_options={"ca_certs": self.ca_bundle},
                            **options)
        else:
            pool = _Pool(*connect_to, host, port, **options)
        self._pools[key] = pool
        return pool

    def close(self):
        """Close every idle connection (a worker that exits, or a test)."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()


def _split(url):
    """(scheme, host, port, request target) of an http(s) URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConnectFailed("the upstream URL is not http(s)")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ConnectFailed("the upstream URL has a bad port") from None
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return scheme, parts.hostname, port, target


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy from the environment."""
    host: str
    port: int
    user: str | None = None
    password: str | None = None

    @property
    def authorization(self):
        """The Proxy-Authorization value a plain-HTTP request through it carries, or None."""
        if self.user is None and self.password is None:
            return None
        token = f"{self.user or ''}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(token).decode()


def _proxy_for(scheme, host):
    """The proxy the environment names for this scheme and host (NO_PROXY honoured), or None:
    what requests did with trust_env."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    parts = urlsplit(url if "//" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:  # socks was an extra for requests too
        return None
    return Proxy(parts.hostname, parts.port or 80,
                 unquote(parts.username) if parts.username is not None else None,
                 unquote(parts.password) if parts.password is not None else None)


def _request_head(pool, scheme, host, port, target, headers, length):
    """The request line and headers, as bytes. A value with a line break (a pasted key)
    would split the request: refused as ConnectFailed, as requests refused it."""
    authority = f"[{host}]" if ":" in host else host
    if port != (443 if scheme == "https" else 80):
        authority += f":{port}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", f"Content-Length: {length}",
             f"User-Agent: {USER_AGENT}", "Accept-Encoding: identity"]
    if pool.proxy is not None and scheme == "http":  # https goes through a CONNECT tunnel
        lines[0] = f"POST http://{authority}{target} HTTP/1.1"  # a proxy takes the whole URL
        if pool.proxy.authorization:
            lines.append(f"Proxy-Authorization: {pool.proxy.authorization}")
    for name, value in headers.items():
        value = str(value)
        if "\r" in value or "\n" in value or "\0" in value or ":" in name or "\n" in name:
            raise ConnectFailed(f"the {name} header has a character a header may not have")
        lines.append(f"{name}: {value}")
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise ConnectFailed("a header has characters outside Latin-1") from None
