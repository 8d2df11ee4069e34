"""The overview (numbers, quick start) and the dashboard (SQL aggregates behind the charts)."""
import json
import re
from datetime import datetime, time, timedelta

import pytest

from tests.support import (
    insert_logs, login_session, make_channel, make_key, make_user,
)


def today():
    return datetime.utcnow().date()


def at(days_ago, minute=0):
    """A moment `days_ago` UTC days back, early in that day (never in the future)."""
    return datetime.combine(today() - timedelta(days=days_ago), time(0, minute, 1))


def chart_data(response):
    """The JSON the page hands to Plotly."""
    text = response.get_data(as_text=True)
    match = re.search(r'<script id="chart-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


@pytest.fixture
def usage(app):
    """Alice and Bob with logs over the last two weeks; returns their ids and rows."""
    with app.app_context():
        ids = {"admin": make_user("admin@example.com", is_admin=True),
               "alice": make_user("alice@example.com"), "bob": make_user("bob@example.com")}
        rows = insert_logs([
            {"user_id": ids["alice"], "created_at": at(0), "model": "gpt-4o", "key_name": "laptop",
             "key_id": None, "prompt_tokens": 100, "completion_tokens": 40, "credits_micro": 3_000_000},
            {"user_id": ids["alice"], "created_at": at(0, 5), "model": "gpt-4o-mini",
             "key_name": "laptop", "prompt_tokens": 7, "completion_tokens": 3, "credits_micro": 11},
            {"user_id": ids["alice"], "created_at": at(2), "model": "gpt-4o-mini", "key_name": "ci",
             "status": "Failed", "http_status": 502, "prompt_tokens": 9, "completion_tokens": 0,
             "credits_micro": 0},
            {"user_id": ids["alice"], "created_at": at(6), "model": "gpt-4o", "key_name": "ci",
             "prompt_tokens": 50, "completion_tokens": 50, "credits_micro": 500_000},
            {"user_id": ids["alice"], "created_at": at(20), "model": "gpt-4o", "key_name": "ci",
             "prompt_tokens": 1000, "completion_tokens": 1000, "credits_micro": 9_000_000},
            {"user_id": ids["bob"], "created_at": at(1), "model": "claude", "key_name": "bot",
             "prompt_tokens": 30, "completion_tokens": 20, "credits_micro": 250_000},
        ])
    return ids, rows


def test_pages_need_login(client):
    for url in ("/", "/dashboard"):
        response = client.get(url)
        assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_member_daily_series_equal_hand_computed_sums(client, usage):
    ids, rows = usage
    login_session(client, ids["alice"])
    data = chart_data(client.get("/dashboard?days=7"))
    days = [(today() - timedelta(days=back)).isoformat() for back in range(6, -1, -1)]
    assert data["days"] == days
    mine = [r for r in rows if r["user_id"] == ids["alice"] and r["created_at"] >= at(6)]
    for name, field in (("prompt_tokens", "prompt_tokens"),
                        ("completion_tokens", "completion_tokens")):
        assert data[name] == [sum(r[field] for r in mine if r["created_at"].date().isoformat() == d)
                              for d in days]
    assert data["requests"] == [1, 0, 0, 0, 0, 0, 2]  # successes only; day -2 failed
    assert data["failed"] == [0, 0, 0, 0, 1, 0, 0]
    assert data["credits"] == [0.5, 0, 0, 0, 0, 0, 3.000011]
    assert data["breakdowns"]["models"]["credits"] == [
        {"label": "gpt-4o", "requests": 2, "credits": 3.5, "tokens": 240},
        {"label": "gpt-4o-mini", "requests": 2, "credits": 0.000011, "tokens": 19}]
    assert data["breakdowns"]["keys"]["credits"] == [
        {"label": "laptop", "requests": 2, "credits": 3.000011, "tokens": 150},
        {"label": "ci", "requests": 2, "credits": 0.5, "tokens": 109}]


def test_ranges_widen_the_window(client, usage):
    ids, _ = usage
    login_session(client, ids["alice"])
    page = client.get("/dashboard?days=30")
    assert len(chart_data(page)["days"]) == 30
    assert sum(chart_data(page)["credits"]) == pytest.approx(12.500011)
    assert "12.500011" in page.get_data(as_text=True)
    assert len(chart_data(client.get("/dashboard?days=90"))["days"]) == 90
    assert len(chart_data(client.get("/dashboard?days=13"))["days"]) == 30  # unknown -> 30


def test_admin_sees_everyone_or_only_themselves(client, usage):
    ids, _ = usage
    login_session(client, ids["admin"])
    data = chart_data(client.get("/dashboard?days=7"))
    assert sum(data["requests"]) + sum(data["failed"]) == 5
    assert [m["label"] for m in data["breakdowns"]["models"]["credits"]] == [
        "gpt-4o", "claude", "gpt-4o-mini"]
    assert "bot · bob@example.com" in [k["label"] for k in data["breakdowns"]["keys"]["credits"]]
    mine = client.get("/dashboard?days=7&scope=mine").get_data(as_text=True)
    assert "No requests in the last 7 days" in mine and "chart-data" not in mine


def test_member_cannot_see_everyone(client, usage):
    ids, _ = usage
    login_session(client, ids["bob"])
    data = chart_data(client.get("/dashboard?days=7&scope=all"))
    assert [m["label"] for m in data["breakdowns"]["models"]["credits"]] == ["claude"]
    assert "alice" not in client.get("/dashboard?scope=all").get_data(as_text=True)


def test_empty_state_points_to_the_quick_start(client, app):
    with app.app_context():
        user_id = make_user("new@example.com")
    login_session(client, user_id)
    text = client.get("/dashboard?days=7").get_data(as_text=True)
    assert "No requests in the last 7 days — make your first call" in text
    assert "quick start" in text and "plotly.min.js" not in text


def test_plotly_is_served_from_our_static(client, usage):
    ids, _ = usage
    login_session(client, ids["alice"])
    text = client.get("/dashboard").get_data(as_text=True)
    src = re.search(r'<script src="([^"]*plotly[^"]*)"', text).group(1)
    assert src.startswith("/static/vendor/plotly.min.js")
    assert "cdn" not in text.lower()
    response = client.get(src)
    assert response.status_code == 200 and response.mimetype == "text/javascript"
    assert "max-age=31536000" in response.headers["Cache-Control"]
    assert len(response.data) > 1_000_000 and b"plotly" in response.data[:1000].lower()


def test_overview_numbers(client, app, usage):
    ids, rows = usage
    with app.app_context():
        from extensions import db
        from models import User
        alice = db.session.get(User, ids["alice"])
        alice.balance_micro, alice.reserved_micro = 12_500_000, 2_000_000
        db.session.commit()
        make_key("alice@example.com", name="one")
        make_key("alice@example.com", name="two")
        make_key("alice@example.com", name="off", disabled=True)
        make_key("alice@example.com", name="old", expires_at=datetime.utcnow() - timedelta(days=1))
    login_session(client, ids["alice"])
    text = client.get("/").get_data(as_text=True)

    def stat(name):
        block = text[text.index(f'id="stat-{name}"'):]
        return re.search(r'class="stat-value">([^<]*)<', block).group(1)
    assert stat("balance") == "12.5"
    assert "10.5 available" in text
    assert stat("today-spend") == "3.000011"  # both of today's rows
    assert stat("today-requests") == "2"
    assert stat("active-keys") == "2"


def snippet(text, name):
    """The literal text of one quick-start snippet, as a browser would copy it."""
    import html
    block = text[text.index(f'id="snippet-{name}"'):]
    return html.unescape(re.search(r'<pre class="code"[^>]*>(.*?)</pre>', block, re.S).group(1))


def test_quick_start_uses_the_request_host(client, usage):
    ids, _ = usage
    login_session(client, ids["alice"])
    text = client.get("/").get_data(as_text=True)
    for name in ("curl", "python", "node", "go"):
        assert "http://localhost/v1" in snippet(text, name)
    assert "stream=True" in snippet(text, "python") and "stream: true" in snippet(text, "node")
    compile(snippet(text, "python"), "quickstart.py", "exec")
    table = text[text.index('id="migration-table"'):text.index("</table>", text.index('id="migration-table"'))]
    assert "<code>OPENAI_BASE_URL</code></td><td><code>http://localhost/v1</code>" in table
    assert "<code>ANTHROPIC_BASE_URL</code></td><td><code>http://localhost</code>" in table
    assert "OPENAI_API_KEY" in table and "ANTHROPIC_API_KEY" in table


def test_quick_start_prefers_the_public_url_and_an_allowed_model(client, app, usage):
    ids, _ = usage
    app.config["PUBLIC_URL"] = "https://ai.example.com"
    with app.app_context():
        from bootstrap import ensure_default_group
        from extensions import db
        make_channel("off", models="zzz-disabled", enabled=False)
        make_channel("main", models="o3-secret,llama-3-70b,gpt-4.1")
        ensure_default_group().models = "llama-3-70b,gpt-4.1"
        db.session.commit()
    login_session(client, ids["alice"])
    text = client.get("/").get_data(as_text=True)
    python = snippet(text, "python")
    assert 'base_url="https://ai.example.com/v1"' in python
    assert 'model="llama-3-70b"' in python
    assert "https://ai.example.com/v1/chat/completions" in snippet(text, "go")
    assert "<code>https://ai.example.com</code>" in text


def test_quick_start_falls_back_to_a_default_model(client, usage):
    ids, _ = usage
    login_session(client, ids["alice"])
    assert 'model="gpt-4o-mini"' in snippet(client.get("/").get_data(as_text=True), "python")


def test_seed_command_fills_logs_and_rollup_consistently(app, runner):
    from sqlalchemy import func, select

    from extensions import db
    from models import RequestLog, UsageDaily
    result = runner.invoke(args=["seed", "logs", "--rows", "3000", "--days", "10", "--users", "3",
                                 "--random-seed", "1"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalar(select(func.count(RequestLog.id))) == 3000
        oldest = db.session.scalar(select(func.min(RequestLog.created_at)))
        assert oldest >= datetime.utcnow() - timedelta(days=10, minutes=1)
        logs = db.session.execute(select(RequestLog)).scalars().all()
        rollup = db.session.execute(select(
            func.sum(UsageDaily.requests), func.sum(UsageDaily.failed),
            func.sum(UsageDaily.prompt_tokens), func.sum(UsageDaily.completion_tokens),
            func.sum(UsageDaily.credits_micro))).one()
        assert tuple(rollup) == (
            len(logs), sum(r.status != "Success" for r in logs),
            sum(r.prompt_tokens for r in logs), sum(r.completion_tokens for r in logs),
            sum(r.credits_micro for r in logs))
        per_day = dict(db.session.execute(select(UsageDaily.day, func.sum(UsageDaily.requests))
                                          .group_by(UsageDaily.day)).all())
        by_hand = {}
        for r in logs:
            by_hand[r.created_at.date().isoformat()] = by_hand.get(r.created_at.date().isoformat(), 0) + 1
        assert per_day == by_hand
    # Running it again adds rows and keeps the rollup whole.
    assert runner.invoke(args=["seed", "logs", "--rows", "100", "--days", "1", "--users", "3"]).exit_code == 0
    with app.app_context():
        assert db.session.scalar(select(func.sum(UsageDaily.requests))) == 3100
