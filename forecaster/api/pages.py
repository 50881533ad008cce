"""What people and Prometheus look at: the HTML page, plots, /metrics, and the sign-in form.

With apiToken set, a browser cannot send the bearer header for the page and its <img> tags:
it signs in once at /login, which exchanges the token for an HttpOnly, SameSite=Strict session
cookie (forecaster/api/auth.py) that reads the page, the plots, /metrics and the API's GETs.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import (
    Blueprint,
    Response,
    current_app,
    redirect,
    render_template_string,
    request,
    url_for,
)
from flask.sansio.blueprints import BlueprintSetupState
from prometheus_client.exposition import choose_encoder
from werkzeug.wrappers import Response as BaseResponse

from forecaster.api.auth import SESSION_COOKIE, SESSION_SECONDS, session_cookie, token_matches
from forecaster.api.errors import error_response
from forecaster.config import Settings
from forecaster.durations import format_duration
from forecaster.engine import Engine
from forecaster.errors import InvalidInputError, UnknownTargetError
from forecaster.plots import PlotCache, plot_share, share_fingerprint
from forecaster.policy import planned_replicas
from forecaster.spec import target_id
from forecaster.target import ShareHeld, Target, freshness_limit, target_labels
from forecaster.telemetry import Telemetry

blueprint = Blueprint("pages", __name__)

ENGINE_KEY = "forecaster.engine"
TELEMETRY_KEY = "forecaster.telemetry"
PLOTS_KEY = "forecaster.plots"
SHARE_PLOTS_KEY = "forecaster.share_plots"
REFRESH_SECONDS = 30

# Marks each plot loaded or failed (and says so on the page); allowed by its hash alone.
_SCRIPT = (
    "window.addEventListener('load',function(){"
    "document.querySelectorAll('img.plot').forEach(function(img){"
    "var ok=img.complete&&img.naturalWidth>0;"
    "img.dataset.state=ok?'loaded':'failed';"
    "if(!ok){img.insertAdjacentText('afterend','plot unavailable');}"
    "});document.body.dataset.ready='1';});"
)
_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:16px 24px;
max-width:1200px;color:#1d1d1f;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}
p.meta{color:#666;margin:0 0 16px}
table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:20px}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e5e5e5;vertical-align:top}
th{background:#f0f0f0;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.fresh{background:#dff3e3;color:#1b5e20}.stale{background:#fde2e1;color:#b71c1c}
.waiting{background:#eee;color:#555}.reactive{background:#fff3cd;color:#7a5b00}
.forecast{background:#e3ecf9;color:#1f4e79}
.outage{background:#b71c1c;color:#fff}
code{font-size:12px;color:#444;word-break:break-all}
section.target{background:#fff;border:1px solid #e5e5e5;border-radius:6px;padding:12px;
margin-bottom:16px}
section.target h2{font-size:15px;margin:0 0 6px}
img.plot{max-width:100%;height:auto;display:block}
.error{color:#b71c1c}
.empty{padding:24px;background:#fff;border:1px dashed #ccc;border-radius:6px;color:#555}
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing loads from elsewhere, and only this page's own script and style run: a name that
# slipped through escaping still could not execute.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; img-src 'self'; script-src {_csp_hash(_SCRIPT)}; "
    f"style-src {_csp_hash(_STYLE)}; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{{ refresh }}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>forecaster</title>
<style>{{ style|safe }}</style>
</head>
<body>
<h1>forecaster</h1>
<p class="meta">{{ rows|length }} target{{ '' if rows|length == 1 else 's' }}
{%- if dry_run %} · <strong>dry run</strong>: KEDA is served the current load{% endif %}
 · refreshes every {{ refresh }} s · <a href="metrics">/metrics</a></p>
{% if not rows %}
<div class="empty" id="no-targets">No targets yet. A target appears when KEDA first asks about
a ScaledObject whose trigger names this scaler, or when it is listed under <code>targets</code>
in the config file.</div>
{% else %}
<table id="targets">
<thead><tr><th>target</th><th>model</th><th>mode</th><th>data</th>
<th>current</th><th>planned load</th><th>planned replicas</th><th>short of capacity</th>
<th>accuracy</th></tr></thead>
<tbody>
{% for row in rows %}
<tr class="target-row" data-target="{{ row.target_id }}">
<td><a href="#{{ row.anchor }}">{{ row.namespace }}/{{ row.name }}</a><br>
<code>{{ row.metric }}</code></td>
<td>{{ row.model }}{% if row.requested != row.model %}<br><small>asked: {{ row.requested }}
</small>{% endif %}</td>
<td><span class="badge {{ row.mode }}">{{ row.mode }}</span>
{%- if row.outage %}<br><small class="outage-note">{{ row.outage }}</small>{% endif %}</td>
<td><span class="badge {{ row.freshness }}">{{ row.freshness }}</span>
{%- if row.age is not none %}<br><small>{{ row.age }} old</small>{% endif %}</td>
<td class="num">{{ row.current }}</td>
<td class="num">{{ row.planned }}</td>
<td class="num">{{ row.replicas }}<br><small>at {{ row.target_value }} each</small></td>
<td class="share">{{ row.share }}</td>
<td>{{ row.accuracy }}</td>
</tr>
{% endfor %}
</tbody>
</table>
{% for row in rows %}
<section class="target" id="{{ row.anchor }}">
<h2>{{ row.target_id }}</h2>
<p><code>{{ row.query }}</code></p>
{% if row.error %}<p class="error">{{ row.error }}</p>{% endif %}
<img class="plot" src="{{ row.plot_url }}" width="900" height="560"
alt="load, forecast and planned replicas of {{ row.target_id }}">
{% if row.share_url %}<img class="plot share-plot" src="{{ row.share_url }}" width="900"
height="280" alt="share of intervals short of capacity of {{ row.target_id }}">{% endif %}
</section>
{% endfor %}
{% endif %}
<script>{{ script|safe }}</script>
</body>
</html>
"""


# The sign-in form: no script; the message for a wrong token shows when the URL's fragment
# names it (a redirect to login#wrong-token), so the form needs no query parameter.
_LOGIN_STYLE = _STYLE + """
form{background:#fff;border:1px solid #e5e5e5;border-radius:6px;padding:16px;max-width:420px}
input[type=password]{width:100%;box-sizing:border-box;padding:6px;margin:8px 0}
#wrong-token{display:none}#wrong-token:target{display:block}
"""
LOGIN_CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src {_csp_hash(_LOGIN_STYLE)}; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>forecaster: sign in</title>
<style>{{ style|safe }}</style>
</head>
<body>
<h1>forecaster</h1>
{% if configured %}
<p id="wrong-token" class="error">That is not the configured apiToken.</p>
<form method="post" action="login">
<label for="token">API token (the config's <code>apiToken</code>)</label>
<input type="password" id="token" name="token" autocomplete="current-password" required
autofocus>
<button type="submit">Sign in</button>
</form>
<p class="meta">Signing in sets a cookie that reads this page for
{{ hours }} hours.</p>
{% else %}
<p class="meta">No apiToken is configured: the <a href="./">page</a> needs no sign-in.</p>
{% endif %}
</body>
</html>
"""


@dataclass(frozen=True)
class _Row:
    target_id: str
    anchor: str
    namespace: str
    name: str
    metric: str
    query: str
    model: str
    requested: str
    mode: str
    outage: str | None
    freshness: str
    age: str | None
    current: str
    planned: str
    replicas: str
    target_value: str
    share: str
    accuracy: str
    error: str | None
    plot_url: str
    share_url: str | None  # None: a fixed quantile, no share held


@blueprint.record_once
def _setup(state: BlueprintSetupState) -> None:
    state.app.extensions.setdefault(PLOTS_KEY, PlotCache())
    state.app.extensions.setdefault(
        SHARE_PLOTS_KEY, PlotCache(draw=plot_share, key=share_fingerprint)
    )


@blueprint.after_app_request
def _count_request(response: Response) -> Response:
    """Count every HTTP request of the app (REST routes included) by route rule and status."""
    telemetry: Telemetry | None = current_app.extensions.get(TELEMETRY_KEY)
    if telemetry is not None:
        rule = request.url_rule.rule if request.url_rule is not None else None
        telemetry.http_request(request.method, rule, response.status_code)
    return response


def _engine() -> Engine:
    engine: Engine = current_app.extensions[ENGINE_KEY]
    return engine


@blueprint.get("/metrics")
def metrics() -> Response:
    telemetry: Telemetry | None = current_app.extensions.get(TELEMETRY_KEY)
    if telemetry is None:
        return error_response(404, "metrics are not enabled: the app has no Telemetry")
    # The format the scraper asks for: OpenMetrics for Prometheus, the text format otherwise.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(telemetry.registry), content_type=content_type)


# `path:` for the name: KEDA names never hold a slash, but a target registered from a config
# file may, and its plot should still load.
@blueprint.get("/api/v1/targets/<namespace>/<path:name>/<metric>/plot.png")
def plot(namespace: str, name: str, metric: str) -> Response:
    """The plot as part of the REST API."""
    return _plot(namespace, name, metric)


@blueprint.get("/targets/<namespace>/<path:name>/<metric>/plot.png")
def page_plot(namespace: str, name: str, metric: str) -> Response:
    """The same plot for the page's <img> tags (which send the session cookie)."""
    return _plot(namespace, name, metric)


@blueprint.get("/api/v1/targets/<namespace>/<path:name>/<metric>/share.png")
def share_plot(namespace: str, name: str, metric: str) -> Response:
    """The share plot as part of the REST API."""
    return _share_plot(namespace, name, metric)


@blueprint.get("/targets/<namespace>/<path:name>/<metric>/share.png")
def page_share_plot(namespace: str, name: str, metric: str) -> Response:
    """The same share plot for the page's <img> tags."""
    return _share_plot(namespace, name, metric)


@blueprint.get("/login")
def login_form() -> Response:
    """The sign-in form: open, like the probes, since it is how a browser gets in."""
    settings: Settings = current_app.config["SETTINGS"]
    html = render_template_string(
        _LOGIN_PAGE, style=_LOGIN_STYLE, configured=bool(settings.api_token),
        hours=SESSION_SECONDS // 3600,
    )
    response = Response(html, mimetype="text/html")
    response.headers["Content-Security-Policy"] = LOGIN_CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.post("/login")
def login() -> BaseResponse:
    """Exchange the API token (form field `token`) for the session cookie, then go to the
    page; a wrong token goes back to the form, which says so."""
    given = request.form.get("token")
    if not given or not given.strip():
        raise InvalidInputError("token", "is required: the form field 'token' with the apiToken")
    settings: Settings = current_app.config["SETTINGS"]
    token = settings.api_token
    if not token:  # nothing to sign in to
        return redirect("./", code=303)
    if not token_matches(given.strip(), token):
        return redirect("login#wrong-token", code=303)
    expires = int(time.time()) + SESSION_SECONDS
    response = redirect("./", code=303)
    response.set_cookie(
        SESSION_COOKIE, session_cookie(token, expires), max_age=SESSION_SECONDS, path="/",
        secure=request.is_secure, httponly=True, samesite="Strict",
    )
    return response


def _plot(namespace: str, name: str, metric: str) -> Response:
    try:
        target = _engine().get(target_id(namespace, name, metric))
    except UnknownTargetError as exc:
        return error_response(404, str(exc))
    cache: PlotCache = current_app.extensions[PLOTS_KEY]
    response = Response(cache.png(target), mimetype="image/png")
    response.headers["Cache-Control"] = "no-cache"
    return response


def _share_plot(namespace: str, name: str, metric: str) -> Response:
    try:
        target = _engine().get(target_id(namespace, name, metric))
    except UnknownTargetError as exc:
        return error_response(404, str(exc))
    if target.share_keeper is None:
        return error_response(
            404, f"target {target.target_id} plans at a fixed quantile "
            f"({target.spec.quantile:g}): it holds no maxUnderProvisioned share to plot")
    cache: PlotCache = current_app.extensions[SHARE_PLOTS_KEY]
    response = Response(cache.png(target), mimetype="image/png")
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/")
def index() -> Response:
    engine = _engine()
    targets = sorted(engine.targets(), key=lambda target: target.target_id)
    rows = [_row(engine, target, index) for index, target in enumerate(targets)]
    html = render_template_string(  # autoescaped: a template from a string always is
        _PAGE,
        rows=rows,
        refresh=REFRESH_SECONDS,
        dry_run=bool(getattr(engine.settings, "dry_run", False)),
        style=_STYLE,
        script=_SCRIPT,
    )
    response = Response(html, mimetype="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    return response


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _share_text(share: ShareHeld | None) -> str:
    """The share of intervals short of capacity against the one asked, over the last day and
    week, and the controller's factor on the plan."""
    if share is None:
        return "fixed quantile"
    achieved = " · ".join(
        f"{share.achieved[window]:.1%} over {window}" for window in ("1d", "7d")
        if share.achieved[window] is not None
    )
    return (f"{achieved or 'not judged yet'} (asked ≤ {share.asked:.1%}); "
            f"plan × {math.exp(share.level):.2f}")


def _clock_time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row(engine: Engine, target: Target, index: int) -> _Row:
    snapshot, spec = target.snapshot, target.spec
    namespace, name, metric = target_labels(target.target_id)
    outage = engine.serving_outage(target.target_id)
    planned = outage or snapshot.planned
    age = engine.age(snapshot)
    if planned is None:
        freshness = "waiting"
    elif age <= freshness_limit(engine.settings, spec):
        freshness = "fresh"
    else:
        freshness = "stale"
    accuracy = target.accuracy()
    if accuracy.scored:
        coverage = accuracy.coverage_80 or 0.0
        accuracy_text = (
            f"MAE {_number(accuracy.mae)} · 80% band held {coverage:.0%} "
            f"(last {accuracy.scored})"
        )
    else:
        accuracy_text = "not scored yet"

    return _Row(
        target_id=target.target_id,
        anchor=f"target-{index}",
        namespace=namespace,
        name=name,
        metric=metric,
        query=spec.query,
        model=snapshot.model or "none",
        requested=spec.model,
        mode=planned.mode if planned is not None else "waiting",
        outage=(
            f"Prometheus unreachable since {_clock_time(outage.outage_since)} UTC: planned "
            f"from the forecast made then, for up to {format_duration(spec.outage_horizon_seconds)}"
            if outage is not None and outage.outage_since is not None else None
        ),
        freshness=freshness,
        age=_duration(age) if math.isfinite(age) else None,
        current=_number(snapshot.current_value),
        planned=_number(planned.value if planned is not None else None),
        replicas=(
            str(planned_replicas(planned.value, spec.target_value)) if planned is not None
            else "–"
        ),
        target_value=_number(spec.target_value),
        share=_share_text(snapshot.share),
        accuracy=accuracy_text,
        error=snapshot.last_error,
        plot_url=url_for(".page_plot", namespace=namespace, name=name, metric=metric),
        share_url=(
            url_for(".page_share_plot", namespace=namespace, name=name, metric=metric)
            if target.share_keeper is not None else None
        ),
    )
