"""Who may call what over HTTP: the API token, the scrape token and the page's session cookie.

With `apiToken` set, every route but the probes (/healthz, /readyz) and the sign-in form
(/login) needs `Authorization: Bearer <apiToken>`, or, for GET and HEAD only, the session
cookie that POST /login sets in exchange for the token: a browser cannot send the header for
the page and its <img> tags. /metrics also takes `metricsToken`, so a scraper holds a token that
reads nothing else; with only `metricsToken` set, /metrics alone is guarded.

The cookie holds no token: it holds its expiry and an HMAC of it keyed by the API token, so it
reads for SESSION_SECONDS, writes nothing (a POST needs the header), dies when the token
changes, and a stolen one cannot be replayed as a bearer token.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from flask import Flask, redirect, request
from werkzeug.wrappers import Response

from forecaster.api.errors import Unauthenticated

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login"})
METRICS_PATH = "/metrics"
PAGE_PATH = "/"
SESSION_COOKIE = "forecaster_session"
SESSION_SECONDS = 12 * 3600
READ_METHODS = frozenset({"GET", "HEAD"})


def session_cookie(token: str, expires: int) -> str:
    """The cookie's value: `<expiry epoch seconds>.<HMAC-SHA256 of it keyed by the token>`."""
    mac = hmac.new(token.encode("utf-8"), f"forecaster-page:{expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def valid_session(token: str, value: str | None, now: float) -> bool:
    """True for a cookie made by `session_cookie(token, ...)` that has not expired."""
    if not value:
        return False
    expires_text, _, _ = value.partition(".")
    if not expires_text.isdigit() or len(expires_text) > 12 or int(expires_text) <= now:
        return False
    # compare_digest: the time taken does not tell how much of a guess was right.
    return hmac.compare_digest(session_cookie(token, int(expires_text)), value)


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison of a presented secret with a configured one."""
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def _bearer() -> str | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def require_tokens(
    app: Flask,
    api_token: str | None,
    metrics_token: str | None = None,
) -> None:
    """Install the check before every request of `app`; nothing is installed without tokens."""
    if not api_token and not metrics_token:
        return

    def wanted() -> dict[str, str]:
        """The settings whose token this request may present, by name."""
        names = {"apiToken": api_token}
        if request.path == METRICS_PATH:
            names["metricsToken"] = metrics_token
        return {name: token for name, token in names.items() if token}

    def accepted() -> bool:
        if request.path in OPEN_PATHS:
            return True
        tokens = wanted()
        if not tokens:  # only metricsToken is set, and this is not /metrics
            return True
        given = _bearer()
        if given is not None and any(token_matches(given, t) for t in tokens.values()):
            return True
        return (
            api_token is not None
            and request.method in READ_METHODS
            and valid_session(api_token, request.cookies.get(SESSION_COOKIE), time.time())
        )

    @app.before_request
    def _check_tokens() -> Response | None:
        if accepted():
            return None
        if (
            request.path == PAGE_PATH
            and request.method in READ_METHODS
            and "text/html" in request.headers.get("Accept", "")
        ):
            # A person at the page: the sign-in form, by a relative URL so that it also
            # works behind a path prefix (kubectl proxy, an ingress).
            return redirect("login", code=303)
        browser = " (a browser signs in at /login instead)" if api_token else ""
        raise Unauthenticated(
            f"this route needs the header 'Authorization: Bearer <token>' with the configured "
            f"{' or '.join(wanted())}{browser}",
            field="Authorization",
        )
