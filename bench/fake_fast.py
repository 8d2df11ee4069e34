"""A minimal, fast OpenAI-compatible fake upstream for `make bench` (asyncio, no framework).

It must never be the bottleneck, so it parses just enough HTTP/1.1 (request line,
Content-Length, keep-alive) and answers POST .../chat/completions with a canned reply:
  non-stream   one chat.completion with usage (12 prompt, 8 completion tokens)
  stream       the role chunk, 8 content chunks ("Hello" first), the finish chunk, the
               usage chunk when `stream_options.include_usage` asks, then [DONE]
  model "slow-*" (stream) the first token at once, then one chunk every --slow-interval
               seconds, --slow-chunks in all: many long-lived streams for the burst test
GET /_health answers 200. Run: python bench/fake_fast.py --port 9100
"""
import argparse
import asyncio
import json
import time

WORDS = ["Hello", " from", " the", " fast", " fake", " upstream", " for", " benchmarks"]
USAGE = {"prompt_tokens": 12, "completion_tokens": len(WORDS), "total_tokens": 12 + len(WORDS)}
SLOW = {"interval": 1.0, "chunks": 5}


def _head(status, content_type, length=None):
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}"]
    lines.append(f"Content-Length: {length}" if length is not None
                 else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunked(payload):
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(data):
    return _chunked(b"data: " + (data if isinstance(data, bytes) else
                                 json.dumps(data, separators=(",", ":")).encode()) + b"\n\n")


def completion(model):
    """The whole non-stream answer, as bytes."""
    body = json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "".join(WORDS)}}], "usage": USAGE},
        separators=(",", ":")).encode()
    return _head("200 OK", "application/json", len(body)) + body


def stream_events(model, include_usage):
    """The stream's chunk bodies (each one SSE event) in order."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(delta, finish=None):
        return _sse(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}]))
    slow = model.startswith("slow")
    words = WORDS[:1] + [" tick"] * (SLOW["chunks"] - 1) if slow else WORDS
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": word}) for word in words]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(_sse(dict(base, choices=[], usage=dict(
            USAGE, completion_tokens=len(words), total_tokens=12 + len(words)))))
    events.append(_sse(b"[DONE]"))
    return events, slow


class FakeUpstream(asyncio.Protocol):
    """One keep-alive connection; requests are answered in order."""

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
        self.busy = False  # a slow stream is being written; later requests wait for it

    def data_received(self, data):
        self.buffer += data
        if not self.busy:
            self._serve()

    def _serve(self):
        while not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            close = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection":
                    close = value.strip().lower() == "close"
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            self._answer(method, path, body, close)
            if close:
                return

    def _answer(self, method, path, body, close):
        if method == "POST" and path.endswith("/chat/completions"):
            request = json.loads(body or b"{}")
            model = request.get("model", "bench")
            if not request.get("stream"):
                self.transport.write(completion(model))
            else:
                include = bool((request.get("stream_options") or {}).get("include_usage"))
                events, slow = stream_events(model, include)
                self.transport.write(_head("200 OK", "text/event-stream"))
                if slow:
                    self.busy = True
                    asyncio.get_running_loop().create_task(self._slow(events, close))
                    return
                self.transport.write(b"".join(events) + b"0\r\n\r\n")
        elif method == "GET" and path.startswith("/_health"):
            self.transport.write(_head("200 OK", "application/json", 11) + b'{"ok":true}')
        else:
            message = b'{"error":{"message":"not found","type":"invalid_request_error"}}'
            self.transport.write(_head("404 Not Found", "application/json", len(message))
                                 + message)
        if close:
            self.transport.close()

    async def _slow(self, events, close):
        try:
            self.transport.write(b"".join(events[:2]))  # role chunk + the first token at once
            for event in events[2:-2]:
                await asyncio.sleep(SLOW["interval"])
                if self.transport.is_closing():
                    return
                self.transport.write(event)
            self.transport.write(b"".join(events[-2:]) + b"0\r\n\r\n")
        finally:
            self.busy = False
        if close:
            self.transport.close()
        elif self.buffer:
            self._serve()


async def serve(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeUpstream, "127.0.0.1", port, backlog=4096,
                                      reuse_address=True)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow-interval", type=float, default=SLOW["interval"])
    parser.add_argument("--slow-chunks", type=int, default=SLOW["chunks"])
    args = parser.parse_args()
    SLOW.update(interval=args.slow_interval, chunks=args.slow_chunks)
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
