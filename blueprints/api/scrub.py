"""Scrubbing upstream text before it is returned, logged or stored.

An upstream's error message may quote the credentials it was sent (`Incorrect API key
provided: sk-...`, `Bearer ...`) and a transport error names our internal topology
(`HTTPConnectionPool(host='10.0.0.5', port=8000) ... url: /v1/chat/completions`). The client
keeps the meaning ("Incorrect API key provided", "model not found"), never those parts.
"""
import re
from urllib.parse import urlsplit

KEY = "[redacted]"
ADDRESS = "[upstream]"

# Order matters: whole structures (URLs, connection pools) before their pieces (hosts, IPs).
_PATTERNS = (
    # urllib3 / requests transport errors: pool, request path and the connection object
    (re.compile(r"HTTPS?ConnectionPool\([^)]*\)"), "upstream connection"),
    (re.compile(r"\burl: \S+"), "url: " + ADDRESS),
    (re.compile(r"<urllib3\.[^>]*>"), "connection"),
    (re.compile(r"\b(?:object )?at 0x[0-9a-fA-F]+"), ""),
    # Credentials in headers or JSON-ish text: Authorization, x-api-key, x-goog-api-key...
    (re.compile(r"(?i)\b(authorization|proxy-authorization)([\"']?\s*[:=]\s*[\"']?)"
                r"(?:(?:bearer|basic|token)\s+)?[^\s\"',;}]+"), r"\1\2" + KEY),
    (re.compile(r"(?i)\b(x-(?:goog-)?api-key|api[-_]?key|access[-_]?token|secret)"
                r"([\"']?\s*[:=]\s*[\"']?)[^\s\"',;}&]+"), r"\1\2" + KEY),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=*\-]{4,}"), r"\1 " + KEY),
    # Query parameters that carry keys: ?key=..., &api_key=..., &token=...
    (re.compile(r"(?i)([?&](?:key|api_key|apikey|token|access_token|sig|signature)=)[^&\s\"']+"),
     r"\1" + KEY),
    # Key-shaped tokens: OpenAI / Anthropic / OpenRouter (sk-..., sk-ant-..., masked
    # sk-abc***wxyz), Google (AIza...), GitHub, Slack, AWS access keys, JWTs.
    (re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-*.]{4,}"), KEY),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{10,}"), KEY),
    (re.compile(r"\b(?:gh[pousr]_|xox[abposr]-|AKIA)[A-Za-z0-9_\-]{8,}"), KEY),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"), KEY),
    # Addresses: URLs, then bare IPs / localhost with or without a port
    (re.compile(r"(?i)\b(?:https?|wss?)://[^\s\"'<>)]+"), ADDRESS),
    (re.compile(r"(?i)\bhost=['\"]?[^'\",)\s]+['\"]?"), "host=" + ADDRESS),
    (re.compile(r"(?i)\bport=\d+"), "port=" + ADDRESS),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b"), ADDRESS),
    (re.compile(r"\[[0-9a-fA-F:]*:[0-9a-fA-F:]*\](?::\d{1,5})?"), ADDRESS),
    (re.compile(r"(?i)\blocalhost(?::\d{1,5})?\b"), ADDRESS),
)
_MIN_SECRET = 4  # shorter "secrets" would turn ordinary words into [redacted]


def channel_secrets(api_key, base_url=None):
    """What must never leave us about one channel: each of its keys and its host name."""
    secrets = [part.strip() for part in re.split(r"[\s,]+", api_key or "") if part.strip()]
    if base_url:
        try:
            host = urlsplit(base_url if "//" in base_url else "//" + base_url).hostname
        except ValueError:
            host = None
        if host:
            secrets.append(host)
    return tuple(secrets)


def scrub_upstream_text(text, secrets=()):
    """`text` without credentials (the given secrets and anything key-shaped) or addresses."""
    if text is None:
        return None
    text = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SECRET}, key=len,
                         reverse=True):
        text = text.replace(secret, KEY)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return re.sub(r"[ \t]{2,}", " ", text)


def storable_text(text, limit=None):
    """`text` as a database can store it: no NUL, no lone surrogates; cut to `limit`."""
    if text is None:
        return None
    text = str(text).replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit] if limit else text
