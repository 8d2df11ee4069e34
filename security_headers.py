"""Security headers on every response, set in one place (issue 10, finding 3).

The console gets a Content-Security-Policy without inline scripts (all JavaScript lives in
/static), cannot be framed, and does not leak its URLs to other sites; the /v1 JSON API gets
nosniff, which is all a non-HTML response needs.
"""
from flask import request

# Plotly's bundle needs neither eval nor inline scripts. It does set style attributes from
# JavaScript, which CSP counts as inline styles, hence 'unsafe-inline' for styles only:
# styles cannot run code.
CONSOLE_CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

CONSOLE_HEADERS = {
    "Content-Security-Policy": CONSOLE_CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def add_security_headers(response):
    """after_request hook: the console's headers, or nosniff alone under /v1."""
    path = request.path
    if path == "/v1" or path.startswith("/v1/"):
        response.headers["X-Content-Type-Options"] = "nosniff"  # its one valid value
        return response
    for name, value in CONSOLE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def register(app):
    """Attach the headers to every response of `app`."""
    app.after_request(add_security_headers)
