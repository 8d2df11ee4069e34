"""The adaptor registry: one adaptor class per channel type."""
import threading

from flask import current_app
from gevent import monkey

from blueprints.api.providers.anthropic import AnthropicAdaptor
from blueprints.api.providers.base import Limits, Target
from blueprints.api.providers.gemini import GeminiAdaptor
from blueprints.api.providers.mock import MockAdaptor
from blueprints.api.providers.openai import OpenAIAdaptor
from blueprints.api.upstream_http import UpstreamHTTP

ADAPTORS = {
    "openai": OpenAIAdaptor,  # OpenAI and every compatible API: DeepSeek, Qwen, vLLM, Ollama...
    "anthropic": AnthropicAdaptor,
    "gemini": GeminiAdaptor,
    "mock": MockAdaptor,
}

_http = None
_http_per_thread = threading.local()


def http_client():
    """The worker's one pooled client for every upstream call (upstream_http.py). Without
    gevent's patching (`flask run`'s threads, the CLI) each thread has its own: a gevent
    socket belongs to the thread whose event loop made it."""
    global _http
    if not monkey.is_module_patched("socket"):
        if getattr(_http_per_thread, "client", None) is None:
            _http_per_thread.client = UpstreamHTTP()
        return _http_per_thread.client
    if _http is None:
        _http = UpstreamHTTP()
    return _http


def timeouts():
    """(connect, read) seconds: connect is short so a dead upstream fails over fast."""
    config = current_app.config
    return (config["UPSTREAM_CONNECT_TIMEOUT"], config["UPSTREAM_TIMEOUT"])


def limits():
    """The overall stream deadline and the upstream body size cap (SPEC §10)."""
    config = current_app.config
    default = Limits()
    return Limits(stream_seconds=config.get("STREAM_MAX_SECONDS", default.stream_seconds),
                  response_bytes=config.get("MAX_RESPONSE_BYTES", default.response_bytes))


def build_adaptor(target):
    """The adaptor for a Target (a channel plus the upstream model name)."""
    return ADAPTORS[target.type](target, http_client(), timeouts(), limits())


def adaptor_for(channel, public_model=None):
    """The adaptor for a Channel row, aimed at `public_model` (default: its first model)."""
    rows = channel.model_rows
    row = next((r for r in rows if r.public_name == public_model), rows[0] if rows else None)
    target = Target(channel_id=channel.id, channel_name=channel.name, type=channel.type,
                    base_url=channel.base_url, api_key=channel.api_key,
                    upstream_model=row.upstream_name if row else (public_model or ""))
    return build_adaptor(target)
