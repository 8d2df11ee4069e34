"""The one narrow interface every upstream adaptor implements.

An adaptor knows its provider's wire format and nothing about keys, credits
or logs. The relay builds a `Call`, picks a `Target` (channel + upstream model
name) and calls `adaptor.send(call)`. It gets back a `Reply` whose bytes are
already in the client's wire format (OpenAI for /v1/chat/completions etc.,
Anthropic for /v1/messages), and whose `usage` is complete once the body was
read or the stream exhausted.

Failures before the first byte raise `UpstreamFailure` (the relay may retry on
another channel when `.retryable`); a break after the first byte raises
`StreamBroken` from `Reply.chunks()`.
"""
import json
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

from blueprints.api.errors import ApiError
from blueprints.api.scrub import scrub_upstream_text
from blueprints.api.upstream_http import (
    ConnectFailed, MalformedAnswer, ReadTimeout, TransportError,
)

# Endpoint names used by Call.endpoint; an adaptor serves those it has send_<name> for.
ENDPOINTS = ("chat", "completions", "embeddings", "responses", "images",
             "audio_speech", "audio_transcriptions", "audio_translations", "messages")


@dataclass
class Usage:
    """What one request consumed, as the upstream reported it (or as counted locally).

    `prompt_tokens` includes cached reads and cache writes (OpenAI's convention);
    `completion_tokens` includes reasoning / thought tokens. `reported` is True only once the
    upstream's FINAL usage arrived (end of body or stream): numbers seen earlier in a stream
    (e.g. Anthropic's message_start) may be stored, but leave `reported` False, so a stream
    cut short is counted from the text actually delivered (`Reply.output_text`).
    """
    prompt_tokens: int = 0  # includes cached reads and cache writes, as OpenAI reports them
    completion_tokens: int = 0  # includes reasoning / thought tokens
    cached_tokens: int = 0  # prompt tokens read from the provider's cache
    cache_write_tokens: int = 0  # prompt tokens written to the cache (Anthropic cache_creation)
    images: int = 0  # images generated
    seconds: int = 0  # audio seconds (transcription / translation), rounded up
    reported: bool = False  # True once the upstream's final usage arrived
    garbled: bool = False  # the upstream sent a number that is not a whole number

    def add_reported(self, prompt=None, completion=None, cached=None, cache_write=None,
                     images=None, seconds=None, final=True):
        """Record numbers the upstream reported (None leaves a field as it was).

        `final=False` stores numbers seen mid-stream (Anthropic's message_start, Gemini's
        running counts) without marking usage as reported. A number that is not a whole count
        counts 0 and marks the usage garbled (see `whole`), so the relay counts locally.
        """
        for name, value in (("prompt_tokens", prompt), ("completion_tokens", completion),
                            ("cached_tokens", cached), ("cache_write_tokens", cache_write),
                            ("images", images)):
            if value is not None:
                setattr(self, name, self.whole(value))
        if seconds is not None:
            self.seconds = self.whole(seconds, round_up=True)
        self.reported = self.reported or final

    def whole(self, value, round_up=False):
        """An upstream's count as an int; anything else (strings, fractions, 1e30 as a float,
        booleans, NaN) counts 0 and marks the usage garbled, so the relay counts locally.
        `round_up`: a fraction is rounded up instead (audio seconds)."""
        number = as_count(value, round_up)
        if number is None:
            self.garbled = True
            return 0
        return number


def as_count(value, round_up=False):
    """An upstream's count as an int, or None when it is not one: ints are kept raw (even
    negative: the relay sanitises them), whole floats below 2**53 become ints (`round_up`:
    any such float, rounded up); strings, NaN and booleans are not counts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and abs(value) < 2**53:
        if value.is_integer():
            return int(value)
        if round_up:
            return math.ceil(value)
    return None


@dataclass
class Call:
    """One client request, as the relay parsed it."""
    endpoint: str  # one of ENDPOINTS
    model: str  # the public model name the client asked for
    body: dict | None  # parsed JSON body; None for multipart uploads
    raw_body: bytes  # the body exactly as received
    content_type: str
    stream: bool = False
    wants_usage: bool = False  # OpenAI streams: client set stream_options.include_usage
    request_id: str = ""
    headers: dict = field(default_factory=dict)  # client headers an adaptor may forward (anthropic-beta...)
    form: dict = field(default_factory=dict)  # multipart text fields (audio uploads)
    files: list = field(default_factory=list)  # multipart files: (field, filename, bytes, type)
    # The most output tokens per choice that the relay reserved credits for. Every adaptor
    # sends exactly this upstream, in the field its provider honours (replacing whatever the
    # client sent), so the hold is a true upper bound. None: the endpoint has no output tokens.
    output_cap: int | None = None

    def json_with(self, **changes):
        """The JSON body with top-level fields replaced, e.g. the upstream model name."""
        body = dict(self.body or {})
        body.update(changes)
        return body


@dataclass
class Target:
    """Where one attempt goes: a channel and the model name that channel expects."""
    channel_id: int
    channel_name: str
    type: str
    base_url: str
    api_key: str
    upstream_model: str
    generation: int = 0  # when the channel was created: a recreated id starts afresh


class UpstreamFailure(Exception):
    """The upstream failed before any byte reached the client. Its message is upstream text,
    scrubbed of anything key- or address-shaped here; the relay also scrubs the channel's own
    key and host, which only it knows."""

    def __init__(self, kind, message, status=None, retry_after=None, error_type=None,
                 error_code=None):
        message = scrub_upstream_text(message)
        super().__init__(message)
        self.kind = kind  # "connect" | "timeout" | "status" | "bad_response"
        self.message = message
        self.status = status  # the upstream's HTTP status, when it answered
        self.retry_after = retry_after
        self.error_type = error_type  # the upstream's own error type, passed through on 4xx
        self.error_code = error_code

    @property
    def retryable(self):
        """Connect errors, timeouts, 5xx, 429 and garbage are worth another channel."""
        if self.kind != "status":
            return True
        return self.status == 429 or self.status >= 500


class StreamBroken(Exception):
    """The upstream stream ended abnormally after bytes went to the client."""

    def __init__(self, message, timeout=False):
        super().__init__(scrub_upstream_text(message))
        self.timeout = timeout  # the upstream went quiet longer than the read timeout


def broken_stream(err):
    """StreamBroken for a transport error raised while reading an upstream stream."""
    timed_out = isinstance(err, ReadTimeout)
    detail = err if isinstance(err, TransportError) else type(err).__name__  # words, no address
    reason = "went quiet for too long" if timed_out else f"broke: {detail}"
    return StreamBroken(f"upstream connection {reason}", timeout=timed_out)


class Reply:
    """What an adaptor returns: a whole body or a stream, in the client's wire format."""

    def __init__(self, status=200, content_type="application/json", body=None, chunks=None,
                 usage=None, headers=None, close=None):
        self.status = status
        self.content_type = content_type
        self.body = body  # bytes, for non-stream replies
        self._chunks = chunks  # iterator of bytes, for streams
        self.usage = usage or Usage()
        self.headers = headers or {}  # extra headers for the client (e.g. audio content-disposition)
        self.output_text = []  # text pieces generated, for counting when usage is missing
        self._close = close

    @property
    def is_stream(self):
        return self._chunks is not None

    def chunks(self) -> Iterator[bytes]:
        return self._chunks

    def close(self):
        """Close the upstream connection (idempotent)."""
        if self._close is not None:
            close, self._close = self._close, None
            close()


@dataclass(frozen=True)
class Limits:
    """How long one stream may last and how many bytes one upstream answer may have."""
    stream_seconds: float = 3600
    response_bytes: int = 64 * 1024 * 1024


class Adaptor:
    """Base of every adaptor. Subclasses define send_<endpoint>(call) -> Reply."""
    type = "base"

    def __init__(self, target, http, timeout, limits=None):
        self.target = target
        self.http = http  # the worker's pooled client (upstream_http.UpstreamHTTP)
        self.timeout = timeout  # (connect seconds, read seconds)
        self.limits = limits or Limits()
        self.started = time.monotonic()  # reset by send(): the stream deadline counts from it

    def send(self, call) -> Reply:
        """Send `call` upstream; raises UpstreamFailure before the first byte."""
        handler = getattr(self, "send_" + call.endpoint, None)
        if handler is None:
            raise ApiError(400, "unsupported_endpoint",
                           f"Model {call.model} is served by a {self.type} channel, "
                           f"which does not support this endpoint.")
        self.started = time.monotonic()
        return handler(call)

    # Helpers for subclasses ------------------------------------------------------------

    def http_post(self, url, body, headers, *, stream=False):
        """POST `body` (bytes) with the worker's pooled client; transport failures become
        UpstreamFailure.

        A non-stream answer (and any error answer) is read here up to the size cap into
        `.content`; a stream's body is left to `stream_pieces`. An oversized body is never
        buffered whole.
        """
        try:
            response = self.http.post(url, body, headers, self.timeout)
        except ConnectFailed as err:  # its text never names our upstream's host or port
            if err.timed_out:
                raise UpstreamFailure("connect", "could not connect to upstream: connect "
                                      "timeout") from None
            raise UpstreamFailure("connect", f"could not reach upstream: {err}") from None
        except ReadTimeout:
            raise UpstreamFailure("timeout", "upstream did not answer in time") from None
        except MalformedAnswer:
            raise UpstreamFailure("bad_response", "upstream did not answer in HTTP") from None
        except TransportError as err:
            raise UpstreamFailure("connect", f"could not reach upstream: {err}") from None
        if response.header("Content-Encoding", "").lower() not in ("", "identity"):
            response.close()  # asked for identity: a compressed answer is not one we can read
            raise UpstreamFailure("bad_response", "upstream sent a compressed answer")
        if not stream or response.status_code >= 400:
            read_capped(response, self.limits.response_bytes,
                        self.started + self.limits.stream_seconds)
        return response

    def stream_pieces(self, response) -> Iterator[bytes]:
        """The upstream stream's byte pieces as they arrive, ended by StreamBroken past the
        stream deadline or the response size cap (a read that blocks is bounded by the read
        timeout, a ReadTimeout)."""
        deadline = self.started + self.limits.stream_seconds
        cap = self.limits.response_bytes
        total = 0
        for piece in response.pieces():
            total += len(piece)
            if total > cap:
                response.close()
                raise StreamBroken(f"upstream stream exceeded {cap} bytes")
            if time.monotonic() > deadline:
                response.close()
                raise StreamBroken(f"stream exceeded {self.limits.stream_seconds:g} seconds",
                                   timeout=True)
            yield piece

    def sse_events(self, response) -> Iterator[bytes]:
        """Whole SSE events from an upstream stream, within the deadline and size cap."""
        return split_sse(self.stream_pieces(response))

    def url(self, path, version="v1"):
        """base_url + /<version>/path, accepting a base URL that already ends in /<version>."""
        base = self.target.base_url.rstrip("/")
        if base.endswith("/" + version):
            base = base[: -len(version) - 1]
        return f"{base}/{version}/{path.lstrip('/')}"


def _too_large():
    return UpstreamFailure("bad_response", "upstream response too large")


def read_capped(response, cap, deadline=None):
    """Read a whole upstream body into `response.content`, at most `cap` bytes; more is
    UpstreamFailure (502), and so is a body still arriving after `deadline`
    (time.monotonic()). The connection goes back to the pool once the body has ended."""
    declared = response.header("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        response.close()
        raise _too_large()
    body = bytearray()
    try:
        for piece in response.pieces():
            body += piece
            if len(body) > cap:
                response.close()
                raise _too_large()
            if deadline is not None and time.monotonic() > deadline:
                response.close()
                raise UpstreamFailure("timeout", "upstream answer took longer than the "
                                      "stream deadline")
    except ReadTimeout:
        raise UpstreamFailure("timeout", "upstream did not finish its answer in time") from None
    except TransportError as err:
        raise UpstreamFailure("connect", f"upstream answer broke: {err}") from None
    response.content = bytes(body)
    return response.content


def split_sse(pieces) -> Iterator[bytes]:
    """Whole SSE events (bytes, without the blank line) from an iterator of byte pieces.

    Yields each event as soon as its terminating blank line arrives, so nothing is held
    back longer than it takes to see the event end. Comment lines (`: keep-alive`,
    `: OPENROUTER PROCESSING`) are dropped, and an event left with no data line is skipped.
    """
    buffer = bytearray()
    scanned = 0  # the buffer before this holds no event end: each byte is searched once
    pending_cr = False
    for piece in pieces:
        if not piece:
            continue
        if pending_cr:
            piece = b"\r" + piece
        pending_cr = piece.endswith(b"\r")
        if pending_cr:  # a \r\n may be split across pieces
            piece = piece[:-1]
        buffer += piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        while True:
            end = buffer.find(b"\n\n", max(scanned - 1, 0))
            if end < 0:
                scanned = len(buffer)
                break
            event = _clean_event(bytes(buffer[:end]))
            del buffer[:end + 2]
            scanned = 0
            if event:
                yield event
    if pending_cr:
        buffer += b"\n"
    event = _clean_event(bytes(buffer))
    if event:
        yield event


def _clean_event(event):
    """The event without its comment lines; None when no data line is left."""
    if b"\n:" in event or event.startswith(b":"):
        event = b"\n".join(line for line in event.split(b"\n") if not line.startswith(b":"))
    if not any(line.startswith(b"data:") or line == b"data" for line in event.split(b"\n")):
        return None
    return event.strip(b"\n")


def sse_data(event: bytes):
    """The (event name, data text) of one SSE event; data lines joined by newlines."""
    name = None
    data = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" ").decode("utf-8", "replace"))
        elif line == b"data":  # a field name alone is the field with an empty value
            data.append("")
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, "\n".join(data)


def sse_encode(data, event=None) -> bytes:
    """One SSE event; `data` is a dict (JSON-encoded) or a ready string."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()
