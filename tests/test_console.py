"""Issue 13 and issue 10 finding 3 through the test client, on SQLite and PostgreSQL: security
headers, channel test results in health, the channel form's key, key editing, code revoking,
the Users list columns, logs filters, the notices and the dashboard's top 10."""
import re
from datetime import timedelta

import pytest

from blueprints.console import format_credits_short, format_number
from blueprints.dashboard.queries import Usage, top_n
from extensions import db
from models import ApiKey, Channel, RedemptionCode, Setting, User, utcnow
from tests.support import free_port, insert_logs, login_session

ADMIN = "admin@example.com"
MEMBER = "member@example.com"
UPSTREAM_KEY = "sk-upstream-very-secret-0123456789"


@pytest.fixture
def admin(app, client, factory):
    user_id = factory.user(ADMIN, is_admin=True)
    login_session(client, user_id)
    return user_id


def one(app, table, **filters):
    with app.app_context():
        return db.session.scalar(db.select(table).filter_by(**filters))


# --- security headers (issue 10, finding 3) -------------------------------------------------

@pytest.mark.parametrize("path", ["/login", "/register", "/admin", "/keys", "/nowhere"])
def test_console_responses_carry_the_security_headers(client, path):
    response = client.get(path)
    csp = response.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


def test_api_responses_carry_nosniff(client):
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_api_neither_reads_nor_sets_the_console_session(app, client, factory):
    """/v1 runs on a null session: a logged-in browser's cookie is not read there (no key, no
    access) and no answer sets or refreshes a cookie; the console still has its session."""
    member = factory.user(MEMBER)
    login_session(client, member)
    with client.session_transaction() as session:
        session.permanent = True  # with SESSION_REFRESH_EACH_REQUEST: re-signed on every answer
    for path in ("/v1/models", "/v1/chat/completions"):
        response = client.get(path) if path == "/v1/models" else client.post(path, json={})
        assert response.status_code == 401, path
        assert "Set-Cookie" not in response.headers, path
    console = client.get("/keys")
    assert console.status_code == 200  # still logged in: the API left the cookie alone
    assert "Set-Cookie" in console.headers  # and the console does re-sign it


def test_flask_limiter_checks_console_requests_but_not_the_api(client, monkeypatch):
    """/v1 has its own limits (rate_limits.py): Flask-Limiter's app-wide check skips it, and
    still runs before console requests (the login limits are tested in test_auth.py)."""
    from flask_limiter import Limiter
    checked = []
    original = Limiter._check_request_limit

    def spy(self, callable_name=None, in_middleware=True):
        from flask import request
        checked.append((request.path, in_middleware))
        return original(self, callable_name, in_middleware)
    monkeypatch.setattr(Limiter, "_check_request_limit", spy)
    assert client.post("/v1/chat/completions", json={}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert checked == []
    client.post("/login", data={"email": "nobody@example.com", "password": "wrong"})
    assert ("/login", True) in checked


def test_no_template_has_inline_script_or_handler():
    """The CSP forbids inline scripts, so none may exist to break."""
    import glob
    import os
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "templates")
    for path in glob.glob(os.path.join(root, "**", "*.html"), recursive=True):
        text = open(path).read()
        for tag in re.findall(r"<script\b[^>]*>", text):
            assert "src=" in tag or 'type="application/json"' in tag, (path, tag)
        assert not re.search(r"\son[a-z]+\s*=", text), path
        assert "<style" not in text, path


# --- channel Test results and health (finding 3) --------------------------------------------

def test_failed_test_turns_health_red_with_host_and_cause_and_no_key(app, client, admin,
                                                                   factory):
    port = free_port()
    channel_id = factory.channel("main", base_url=f"http://127.0.0.1:{port}",
                                 api_key=UPSTREAM_KEY)
    client.post(f"/admin/channels/{channel_id}/test")
    channel = one(app, Channel, id=channel_id)
    assert channel.last_test_ok is False and channel.last_test_at is not None
    assert channel.health() == "failing"
    assert f"127.0.0.1:{port}" in channel.last_error and "connection refused" in channel.last_error
    html = client.get("/admin/channels").get_data(as_text=True)
    row = html[html.index('data-channel="main"'):]
    row = row[:row.index("</tr>")]
    assert "test failed" in row and "badge-ok" not in row.split('class="last-test"')[0]
    assert "never" not in row and UPSTREAM_KEY not in html


def test_a_passing_test_after_a_failure_is_healthy_again(app, client, admin, factory,
                                                        fake_upstream):
    channel_id = factory.channel("main", base_url=f"http://127.0.0.1:{free_port()}")
    client.post(f"/admin/channels/{channel_id}/test")
    assert one(app, Channel, id=channel_id).health() == "failing"
    with app.app_context():
        db.session.get(Channel, channel_id).base_url = fake_upstream.url
        db.session.commit()
    client.post(f"/admin/channels/{channel_id}/test")
    channel = one(app, Channel, id=channel_id)
    assert (channel.last_test_ok, channel.health()) == (True, "healthy")


def test_editing_a_channel_clears_an_old_test_result(app, client, admin, factory):
    channel_id = factory.channel("main", base_url=f"http://127.0.0.1:{free_port()}")
    client.post(f"/admin/channels/{channel_id}/test")
    form = {"name": "main", "type": "openai", "base_url": "http://127.0.0.1:9",
            "api_key": "", "models": "gpt-4o-mini", "priority": "0", "weight": "1",
            "enabled": "y"}
    client.post(f"/admin/channels/{channel_id}/edit", data=form)
    assert one(app, Channel, id=channel_id).last_test_ok is None


# --- the channel form and its key (finding 5) -----------------------------------------------

CHANNEL_FORM = {"name": "new", "type": "openai", "base_url": "https://api.example.com",
                "models": "gpt-4o-mini", "priority": "0", "weight": "1", "enabled": "y"}


def test_channel_form_keeps_the_typed_key_on_a_validation_error(app, client, admin):
    response = client.post("/admin/channels/new", data={**CHANNEL_FORM, "base_url": "nope",
                                                        "api_key": UPSTREAM_KEY})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert f'value="{UPSTREAM_KEY}"' in html and 'id="api-key-kept"' in html
    assert one(app, Channel, name="new") is None


def test_channel_without_a_key_is_refused_unless_asked_for(app, client, admin):
    response = client.post("/admin/channels/new", data={**CHANNEL_FORM, "api_key": ""})
    assert response.status_code == 400
    assert "Enter the provider" in response.get_data(as_text=True)
    assert one(app, Channel, name="new") is None
    client.post("/admin/channels/new", data={**CHANNEL_FORM, "api_key": "", "no_key": "y"})
    assert one(app, Channel, name="new").api_key == ""


def test_edit_page_never_renders_the_stored_key(app, client, admin, factory):
    channel_id = factory.channel("main", base_url="https://a.example", api_key=UPSTREAM_KEY)
    assert UPSTREAM_KEY not in client.get(f"/admin/channels/{channel_id}/edit").get_data(
        as_text=True)


# --- keys: edit, names (findings 12, 10, 13) ------------------------------------------------

def test_member_edits_name_limits_and_expiry_of_a_key(app, client, factory):
    user_id = factory.user(MEMBER)
    factory.key(MEMBER, name="laptop")
    login_session(client, user_id)
    key = one(app, ApiKey, name="laptop")
    page = client.get(f"/keys/{key.id}/edit").get_data(as_text=True)
    assert 'value="laptop"' in page
    expiry = (utcnow() + timedelta(days=10)).date()
    response = client.post(f"/keys/{key.id}/edit", data={
        "name": "desktop", "expires_on": expiry.isoformat(), "credit_limit": "2.5",
        "rpm": "7", "models": "gpt-4o-mini", "allowed_ips": "10.0.0.0/8"})
    assert response.status_code == 302
    key = one(app, ApiKey, id=key.id)
    assert (key.name, key.expires_at.date(), key.credit_limit_micro, key.rpm, key.models,
            key.allowed_ips) == ("desktop", expiry, 2_500_000, 7, "gpt-4o-mini", "10.0.0.0/8")
    # Clearing the fields removes the expiry and the limit.
    client.post(f"/keys/{key.id}/edit", data={"name": "desktop", "rpm": "0"})
    key = one(app, ApiKey, id=key.id)
    assert (key.expires_at, key.credit_limit_micro, key.models) == (None, None, None)
    bad = client.post(f"/keys/{key.id}/edit", data={"name": "", "credit_limit": "lots"})
    assert bad.status_code == 400 and one(app, ApiKey, id=key.id).name == "desktop"


def test_members_cannot_edit_each_others_keys(app, client, factory):
    factory.user("other@example.com")
    factory.key("other@example.com", name="theirs")
    login_session(client, factory.user(MEMBER))
    key = one(app, ApiKey, name="theirs")
    assert client.get(f"/keys/{key.id}/edit").status_code == 404
    assert client.post(f"/keys/{key.id}/edit", data={"name": "mine"}).status_code == 404
    assert one(app, ApiKey, id=key.id).name == "theirs"


def test_key_buttons_say_which_key(app, client, factory):
    login_session(client, factory.user(MEMBER))
    factory.key(MEMBER, name="laptop")
    html = client.get("/keys").get_data(as_text=True)
    for label in ("Edit key laptop", "Disable key laptop", "Delete key laptop"):
        assert f'aria-label="{label}"' in html
    assert "Copy to clipboard" not in html


# --- codes: revoke (finding 12) -------------------------------------------------------------

def test_revoked_code_cannot_be_redeemed(app, client, admin, factory):
    from billing import create_codes, redeem_code
    with app.app_context():
        code, used = create_codes(1_000_000, 2)
        member = factory.user(MEMBER)
        redeem_code(member, used)
    row = one(app, RedemptionCode, code=code)
    assert client.post(f"/admin/codes/{row.id}/revoke").status_code == 302
    row = one(app, RedemptionCode, code=code)
    assert row.revoked_at is not None
    with app.app_context(), pytest.raises(ValueError):
        redeem_code(member, code)
    assert one(app, User, id=member).balance_micro == 1_000_000
    html = client.get("/admin/codes?status=revoked").get_data(as_text=True)
    assert code in html and used not in html
    # A redeemed code cannot be revoked.
    used_row = one(app, RedemptionCode, code=used)
    client.post(f"/admin/codes/{used_row.id}/revoke")
    assert one(app, RedemptionCode, code=used).revoked_at is None


# --- users list (finding 12) ----------------------------------------------------------------

def test_users_list_shows_spend_and_last_active(app, client, admin, factory):
    member = factory.user(MEMBER)
    factory.key(MEMBER, name="laptop")
    with app.app_context():
        key = db.session.scalar(db.select(ApiKey).filter_by(name="laptop"))
        key.last_used_at = utcnow().replace(microsecond=0)
        db.session.commit()
        used = key.last_used_at
        insert_logs([{"user_id": member, "credits_micro": 1_500_000, "created_at": utcnow()},
                     {"user_id": member, "credits_micro": 2_000_000,
                      "created_at": utcnow() - timedelta(days=45)}])  # outside 30 days
    html = client.get("/admin/users").get_data(as_text=True)
    row = html[html.index(f'data-email="{MEMBER}"'):]
    row = row[:row.index("</tr>")]
    assert re.search(r'class="num spent"><a [^>]*>1\.5<', row)
    assert used.strftime("%Y-%m-%d %H:%M") in row
    assert "Spent (30 days)" in html and "Last active" in html


# --- logs filters (finding 13) --------------------------------------------------------------

def test_an_invalid_date_filter_is_said_not_ignored(app, client, factory):
    login_session(client, factory.user(MEMBER))
    response = client.get("/logs?from=31/12/2026")
    assert response.status_code == 400
    assert "is not a date" in response.get_data(as_text=True)
    assert client.get("/logs.csv?to=yesterday").status_code == 400


def test_admin_key_filter_tells_members_laptops_apart(app, client, admin, factory):
    alice, bob = factory.user("alice@example.com"), factory.user("bob@example.com")
    factory.key("alice@example.com", name="laptop")
    factory.key("bob@example.com", name="laptop")
    with app.app_context():
        keys = {k.user_id: k.id for k in db.session.scalars(db.select(ApiKey))}
        insert_logs([{"user_id": alice, "key_id": keys[alice], "key_name": "laptop",
                      "request_id": "from-alice"},
                     {"user_id": bob, "key_id": keys[bob], "key_name": "laptop",
                      "request_id": "from-bob"}])
    html = client.get("/logs").get_data(as_text=True)
    assert "laptop · alice@example.com" in html and "laptop · bob@example.com" in html
    filtered = client.get(f"/logs?key_id={keys[bob]}").get_data(as_text=True)
    assert "from-bob" in filtered and "from-alice" not in filtered


# --- notices (findings 2 and 11) ------------------------------------------------------------

def test_zero_credit_banner_says_how_to_get_credits(app, client, factory):
    factory.user(ADMIN, is_admin=True)
    login_session(client, factory.user(MEMBER))
    html = client.get("/").get_data(as_text=True)
    banner = html[html.index('id="no-credits-banner"'):]
    banner = banner[:banner.index("</div>")]
    assert "/wallet#redeem" in banner and ADMIN in banner and "402" in banner
    login_session(client, factory.user("rich@example.com", credits=1))
    assert 'id="no-credits-banner"' not in client.get("/").get_data(as_text=True)


def test_printed_bootstrap_password_is_flagged_until_changed(app, client):
    from bootstrap import bootstrap_admin
    app.config["ADMIN_PASSWORD"] = None
    with app.app_context():
        email, password, _ = bootstrap_admin(app)
        admin_id = db.session.scalar(db.select(User.id).filter_by(email=email))
    login_session(client, admin_id)
    assert 'id="change-password-notice"' in client.get("/admin").get_data(as_text=True)
    client.post("/account/password", data={"current": password, "password": "a-new-pass-123",
                                           "confirm": "a-new-pass-123"})
    assert one(app, Setting, key="bootstrap_password_hash") is not None
    assert 'id="change-password-notice"' not in client.get("/admin").get_data(as_text=True)


def test_admin_home_is_a_setup_checklist(app, client, admin, factory):
    html = client.get("/admin").get_data(as_text=True)
    assert "0 of 4 done" in html
    factory.channel("main", base_url="https://a.example")
    factory.price("gpt-4o-mini")
    factory.user(MEMBER)
    html = client.get("/admin").get_data(as_text=True)
    assert "3 of 4 done" in html  # channel, prices, a member; not yet tested
    assert re.search(r'id="step-test">\s*<span class="step"[^>]*>2<', html)


def test_account_actions_ask_first(app, client, admin, factory):
    member = factory.user(MEMBER)
    html = client.get(f"/admin/users/{member}").get_data(as_text=True)
    for action in ("toggle-disabled", "toggle-admin"):
        form = re.search(rf'<form[^>]*action="/admin/users/{member}/{action}"[^>]*>', html).group(0)
        assert "data-confirm=" in form and MEMBER in form


# --- formatting and top 10 (finding 6) ------------------------------------------------------

def test_numbers_are_formatted_for_people():
    assert format_number(39677827) == "39,677,827"
    assert format_credits_short(12_511_634) == "12.51"
    assert format_credits_short(1_234_000_000) == "1,234"
    assert format_credits_short(25) == "0.000025"
    assert format_credits_short(0) == "0"


def test_top_ten_folds_the_rest_into_other():
    usages = [Usage(f"k{n}", requests=n + 1, credits_micro=0 if n % 2 else n) for n in range(15)]
    by_requests = top_n(usages, "requests")
    assert [u.label for u in by_requests[:3]] == ["k14", "k13", "k12"]
    assert by_requests[-1].label == "other (5 more)"
    assert by_requests[-1].requests == sum(range(1, 6))
    by_credits = top_n(usages, "credits")  # keys that spent nothing are not bars of zero
    assert len(by_credits) == 7 and all(u.credits_micro for u in by_credits)


# --- accessibility and polish (findings 10 and 13) --------------------------------------------

def test_skip_link_comes_first_and_charts_have_text(app, client, factory):
    user_id = factory.user(MEMBER)
    login_session(client, user_id)
    with app.app_context():
        insert_logs([{"user_id": user_id, "created_at": utcnow()}])
    html = client.get("/dashboard").get_data(as_text=True)
    body = html[html.index("<body"):]
    assert body.index('class="skip-link" href="#content"') < body.index("<nav")
    assert '<main class="main" id="content"' in html and 'aria-live="polite"' in html
    for chart in ("requests", "tokens", "credits", "models", "keys"):
        assert re.search(rf'<figure class="chart-figure" aria-labelledby="h-{chart}" '
                         rf'aria-describedby="d-{chart}">', html)
        assert f'id="d-{chart}"' in html
    assert 'id="daily-table"' in html


def test_ledger_rows_without_a_request_show_a_dash_not_an_empty_box(app, client, factory):
    login_session(client, factory.user(MEMBER, credits=5))
    html = client.get("/wallet").get_data(as_text=True)
    assert "<code></code>" not in html
    row = html[html.index('id="ledger"'):]
    assert "—" in row[:row.index("</tbody>")]
