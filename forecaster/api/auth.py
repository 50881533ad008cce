"""An optional bearer token for the REST API (settings.api_token; off when unset).

Only paths under /api/ are guarded: probes (/healthz, /readyz), Prometheus (/metrics), the
page (/) and the API description (/openapi.json) stay open.
"""

from __future__ import annotations

import hmac

from flask import Flask, request

from forecaster.api.errors import Unauthenticated

PROTECTED_PREFIX = "/api/"


def require_bearer_token(app: Flask, token: str | None) -> None:
    """Install a check that every /api/ request sends `Authorization: Bearer <token>`."""
    if not token:
        return
    expected = token.encode("utf-8")

    @app.before_request
    def _check_token() -> None:
        if not request.path.startswith(PROTECTED_PREFIX):
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8"), expected
        ):
            raise Unauthenticated(
                "this route needs the header 'Authorization: Bearer <token>' with the "
                "configured apiToken",
                field="Authorization",
            )
