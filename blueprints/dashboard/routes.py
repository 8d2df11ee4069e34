"""Console pages: the overview with its quick start, and the Plotly usage dashboard."""
import os

import plotly
from flask import Blueprint, current_app, render_template, request, send_file
from flask_login import current_user, login_required

from blueprints.dashboard.queries import (
    METRICS, RANGES, active_key_count, daily_usage, quickstart_model, today_usage, top_n,
    usage_by_key, usage_by_model, usage_by_user, usage_scope,
)
from extensions import db
from models import User

bp = Blueprint("dashboard", __name__)

PLOTLY_JS = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
YEAR = 365 * 24 * 3600


def public_base_url():
    """This instance's root as clients should reach it: TOKENOPEN_PUBLIC_URL or the request host."""
    return (current_app.config.get("PUBLIC_URL") or request.host_url).rstrip("/")


@bp.get("/")
@login_required
def overview():
    """Balance, today's usage, active keys, and a quick start for this instance."""
    base_url = public_base_url()
    return render_template(
        "dashboard/overview.html", today=today_usage(current_user.id),
        active_keys=active_key_count(current_user.id), base_url=base_url,
        api_base=base_url + "/v1", model=quickstart_model(current_user))


@bp.get("/dashboard")
@login_required
def charts():
    """Daily requests, tokens and credits, and per-model / per-key (/ per-user) breakdowns,
    each switchable between credits, requests and tokens, top 10 plus "other"."""
    days = request.args.get("days", 30, type=int)
    days = days if days in RANGES else 30
    viewed = None
    if current_user.is_admin and request.args.get("user", type=int):
        viewed = db.session.get(User, request.args.get("user", type=int))
    everyone = current_user.is_admin and viewed is None and \
        request.args.get("scope", "all") == "all"
    scope = usage_scope(current_user, everyone, viewed.id if viewed else None)
    daily = daily_usage(scope, days)
    breakdowns = {"models": usage_by_model(scope, days),
                  "keys": usage_by_key(scope, days, with_owner=everyone)}
    if everyone:
        breakdowns["users"] = usage_by_user(scope, days)
    totals = {"requests": sum(d.requests for d in daily), "failed": sum(d.failed for d in daily),
              "prompt_tokens": sum(d.prompt_tokens for d in daily),
              "completion_tokens": sum(d.completion_tokens for d in daily),
              "credits_micro": sum(d.credits_micro for d in daily)}
    # Free models cost nothing: open on requests then, or the charts would look empty.
    metric = request.args.get("metric")
    if metric not in METRICS:
        metric = "credits" if totals["credits_micro"] else "requests"
    chart_data = {
        "days": [d.label for d in daily],
        "requests": [d.requests - d.failed for d in daily],
        "failed": [d.failed for d in daily],
        "prompt_tokens": [d.prompt_tokens for d in daily],
        "completion_tokens": [d.completion_tokens for d in daily],
        "credits": [d.credits for d in daily],
        "metric": metric,
        "breakdowns": {name: {m: [_breakdown(u) for u in top_n(rows, m)] for m in METRICS}
                       for name, rows in breakdowns.items()},
    }
    tables = {name: top_n(rows, metric) for name, rows in breakdowns.items()}
    return render_template("dashboard/charts.html", days=days, ranges=RANGES,
                           everyone=everyone, viewed=viewed, totals=totals, daily=daily,
                           tables=tables, metric=metric, metrics=list(METRICS),
                           chart_data=chart_data, plotly_version=plotly.__version__)


def _breakdown(usage):
    return {"label": usage.label, "requests": usage.requests, "credits": usage.credits,
            "tokens": usage.tokens}


@bp.get("/static/vendor/plotly.min.js")
def plotly_js():
    """Plotly's bundle from the installed package, so charts work air-gapped (no CDN)."""
    return send_file(PLOTLY_JS, mimetype="text/javascript", max_age=YEAR, conditional=True)
