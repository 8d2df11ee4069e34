"""The adaptor registry: one adaptor class per channel type."""
import os

import requests
from flask import current_app

from blueprints.api.providers.anthropic import AnthropicAdaptor
from blueprints.api.providers.base import Limits, Target
from blueprints.api.providers.gemini import GeminiAdaptor
from blueprints.api.providers.mock import MockAdaptor
from blueprints.api.providers.openai import OpenAIAdaptor

ADAPTORS = {
    "openai": OpenAIAdaptor,  # OpenAI and every compatible API: DeepSeek, Qwen, vLLM, Ollama...
    "anthropic": AnthropicAdaptor,
    "gemini": GeminiAdaptor,
    "mock": MockAdaptor,
}

_http = None
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def http_session():
    """The worker's one pooled requests.Session for every upstream call."""
    global _http
    if _http is None:
        session = requests.Session()
        # requests re-reads the environment on every call (~0.4 ms) when trust_env is on:
        # only pay that when a proxy is configured; a CA bundle is read once, here.
        session.trust_env = any(os.environ.get(name) for name in PROXY_VARIABLES)
        bundle = next((os.environ[n] for n in CA_BUNDLE_VARIABLES if os.environ.get(n)), None)
        if bundle:
            session.verify = bundle
        adapter = requests.adapters.HTTPAdapter(pool_connections=32, pool_maxsize=256)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _http = session
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
    return ADAPTORS[target.type](target, http_session(), timeouts(), limits())


def adaptor_for(channel, public_model=None):
    """The adaptor for a Channel row, aimed at `public_model` (default: its first model)."""
    rows = channel.model_rows
    row = next((r for r in rows if r.public_name == public_model), rows[0] if rows else None)
    target = Target(channel_id=channel.id, channel_name=channel.name, type=channel.type,
                    base_url=channel.base_url, api_key=channel.api_key,
                    upstream_model=row.upstream_name if row else (public_model or ""))
    return build_adaptor(target)
