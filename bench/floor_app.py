"""The floor of our stack for `make bench`: what gunicorn + gevent + Flask cost on this machine
before any gateway work, so a run on a slower or busier machine can still be read.

  POST /canned/v1/chat/completions   answers the fake upstream's reply bytes, relaying nothing
  POST /relay/v1/chat/completions    relays the body to FLOOR_UPSTREAM with the gateway's own
                                     upstream client (blueprints/api/upstream_http.py) and
                                     answers what came back: no key, limit, hold, settlement
                                     or log row

TokenOpen's latency minus the relay floor's is what authentication, limits, billing and
logging add. Served by bench/run.py as `gunicorn -k gevent -w 1 bench.floor_app:app`.
"""
import os

from flask import Flask, Response, request

from blueprints.api.upstream_http import UpstreamHTTP

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:9100") + "/v1/chat/completions"
CANNED = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench-model",'
          b'"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant",'
          b'"content":"Hello from the fast fake upstream for benchmarks"}}],'
          b'"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}')

app = Flask(__name__)
client = UpstreamHTTP()


@app.get("/")
def health():
    return "ok"


@app.post("/canned/v1/chat/completions")
def canned():
    request.get_data()
    return Response(CANNED, content_type="application/json")


@app.post("/relay/v1/chat/completions")
def relay():
    answer = client.post(UPSTREAM, request.get_data(), {
        "Content-Type": "application/json", "Authorization": "Bearer sk-fake-upstream"},
        timeout=(10, 60))
    body = b"".join(answer.pieces())
    answer.close()
    return Response(body, status=answer.status_code,
                    content_type=answer.header("Content-Type", "application/json"))
