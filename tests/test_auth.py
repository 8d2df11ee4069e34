"""Accounts: register (open / invite / closed), log in and out, change password, limits, CSRF."""
import re

from blueprints.auth.access import admin_required
from extensions import db
from models import LedgerEntry, RedemptionCode, Setting, User

PASSWORD = "password123"


def register(client, email="new@example.com", password=PASSWORD, confirm=None, code=None):
    data = {"email": email, "password": password, "confirm": confirm or password}
    if code is not None:
        data["code"] = code
    return client.post("/register", data=data)


def login(client, email="member@example.com", password=PASSWORD, next_url=None, **kw):
    url = "/login" + (f"?next={next_url}" if next_url else "")
    return client.post(url, data={"email": email, "password": password}, **kw)


def user_by_email(app, email):
    with app.app_context():
        return db.session.scalar(db.select(User).filter_by(email=email))


def user_count(app):
    with app.app_context():
        return db.session.scalar(db.select(db.func.count(User.id)))


def put_setting(app, key, value):
    with app.app_context():
        Setting.put(key, value)
        db.session.commit()


def logged_in(client):
    """True when the session is logged in: /keys serves the page instead of the login redirect."""
    return client.get("/keys").status_code == 200


def csrf_token(html):
    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html).group(1)


# --- register -------------------------------------------------------------------------------

def test_register_creates_member_logs_in_and_goes_to_overview(app, client):
    assert "Create an account" in client.get("/register").get_data(as_text=True)
    resp = register(client, email="New@Example.com")
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/"
    user = user_by_email(app, "new@example.com")
    assert user is not None and not user.is_admin
    assert user.balance_micro == 0
    assert user.password_hash.startswith("scrypt:")
    assert user.check_password(PASSWORD)
    with app.app_context():
        assert db.session.get(User, user.id).group.name == "default"
        assert db.session.scalar(db.select(db.func.count(LedgerEntry.id))) == 0
    assert logged_in(client)


def test_register_grants_signup_bonus_from_setting(app, client):
    put_setting(app, "signup_bonus_micro", 2_500_000)
    assert register(client).status_code == 302
    user = user_by_email(app, "new@example.com")
    assert user.balance_micro == 2_500_000
    with app.app_context():
        entry = db.session.scalar(db.select(LedgerEntry).filter_by(user_id=user.id))
        assert (entry.kind, entry.amount_micro, entry.note) == ("grant", 2_500_000, "signup bonus")


def test_register_duplicate_email_is_refused(app, client, factory):
    factory.user("taken@example.com")
    resp = register(client, email="Taken@example.com", password="different-pass")
    assert resp.status_code == 200
    assert "An account cannot be created with this email address." in resp.get_data(as_text=True)
    assert user_count(app) == 1
    assert user_by_email(app, "taken@example.com").check_password(PASSWORD)
    assert not logged_in(client)


def test_register_rejects_bad_input_inline(app, client):
    page = register(client, email="not-an-email").get_data(as_text=True)
    assert 'class="field has-error"' in page and "Invalid email address." in page
    page = register(client, password="short").get_data(as_text=True)
    assert "Field must be at least 8 characters long." in page
    page = register(client, password=PASSWORD, confirm="something-else").get_data(as_text=True)
    assert "The two passwords do not match." in page
    assert user_count(app) == 0


def test_registration_closed_by_setting_refuses_post(app, client):
    put_setting(app, "registration", "closed")
    page = client.get("/register").get_data(as_text=True)
    assert "Registration is closed" in page and 'name="password"' not in page
    resp = register(client)
    assert resp.status_code == 403
    assert user_count(app) == 0
    assert 'href="/register"' not in client.get("/login").get_data(as_text=True)


def test_registration_closed_by_config(app, client):
    app.config["REGISTRATION"] = "closed"
    assert register(client).status_code == 403
    assert user_count(app) == 0


def test_setting_overrides_config_registration_mode(app, client):
    app.config["REGISTRATION"] = "closed"
    put_setting(app, "registration", "open")
    assert register(client).status_code == 302
    assert user_count(app) == 1


def _make_code(app, amount_micro=3_000_000):
    from billing import create_codes
    with app.app_context():
        return create_codes(amount_micro, 1)[0]


def test_invite_mode_requires_a_valid_code(app, client):
    put_setting(app, "registration", "invite")
    page = client.get("/register").get_data(as_text=True)
    assert "invite-only" in page and 'name="code"' in page

    page = register(client).get_data(as_text=True)
    assert "An invite code is required to register here." in page
    page = register(client, code="0" * 32).get_data(as_text=True)
    assert "This invite code is unknown or has already been used." in page
    assert user_count(app) == 0

    code = _make_code(app)
    resp = register(client, code=code.upper())  # people paste codes in any case
    assert resp.status_code == 302
    user = user_by_email(app, "new@example.com")
    assert user.balance_micro == 3_000_000
    with app.app_context():
        row = db.session.scalar(db.select(RedemptionCode).filter_by(code=code))
        assert row.redeemed_by_id == user.id and row.redeemed_at is not None
        kinds = db.session.scalars(db.select(LedgerEntry.kind).filter_by(user_id=user.id)).all()
        assert kinds == ["redemption"]


def test_invite_code_cannot_be_used_twice(app, client):
    put_setting(app, "registration", "invite")
    code = _make_code(app)
    assert register(client, email="first@example.com", code=code).status_code == 302
    other = app.test_client()
    page = register(other, email="second@example.com", code=code).get_data(as_text=True)
    assert "This invite code is unknown or has already been used." in page
    assert user_by_email(app, "second@example.com") is None
    assert user_count(app) == 1


def test_invite_mode_leaves_no_user_when_redemption_fails(app, client, monkeypatch):
    """The code passes the pre-check but another request takes it before ours redeems it."""
    import blueprints.auth.signup as signup
    put_setting(app, "registration", "invite")
    code = _make_code(app)

    def raced(user_id, code):
        raise ValueError("That redemption code has already been used.")
    monkeypatch.setattr(signup, "redeem_code", raced)
    page = register(client, code=code).get_data(as_text=True)
    assert "That redemption code has already been used." in page
    assert user_count(app) == 0


# --- log in / log out -----------------------------------------------------------------------

def test_login_and_logout(app, client, factory):
    factory.user("member@example.com")
    assert "Log in" in client.get("/login").get_data(as_text=True)
    resp = login(client, email=" Member@Example.com ")
    assert resp.status_code == 302 and resp.headers["Location"] == "/"
    assert logged_in(client)
    page = client.get("/keys").get_data(as_text=True)
    assert "member@example.com" in page and "Change password" in page

    confirm = client.get("/logout")  # a GET (a link, a prefetch) never logs anyone out
    assert confirm.status_code == 200 and "Stay logged in" in confirm.get_data(as_text=True)
    assert logged_in(client)
    resp = client.post("/logout")
    assert resp.status_code == 302 and resp.headers["Location"] == "/login"
    assert not logged_in(client)


def test_wrong_password_is_refused_with_a_clear_message(app, client, factory):
    factory.user("member@example.com")
    resp = login(client, password="wrong-password")
    assert resp.status_code == 200
    assert "Wrong email or password." in resp.get_data(as_text=True)
    assert not logged_in(client)
    resp = login(client, email="nobody@example.com")
    assert "Wrong email or password." in resp.get_data(as_text=True)
    assert not logged_in(client)


def test_disabled_user_cannot_log_in(app, client, factory):
    user_id = factory.user("member@example.com")
    with app.app_context():
        db.session.get(User, user_id).disabled = True
        db.session.commit()
    resp = login(client)
    assert "This account is disabled." in resp.get_data(as_text=True)
    assert not logged_in(client)


def test_disabling_a_logged_in_user_ends_their_session(app, client, factory):
    user_id = factory.user("member@example.com")
    login(client)
    assert logged_in(client)
    with app.app_context():
        db.session.get(User, user_id).disabled = True
        db.session.commit()
    assert not logged_in(client)


def test_next_redirects_only_to_local_paths(app, client, factory):
    factory.user("member@example.com")
    resp = client.get("/keys")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login?next=")
    assert login(client, next_url="/keys").headers["Location"] == "/keys"
    for evil in ("https://evil.example/", "//evil.example/", "/\\evil.example", "javascript:x"):
        client.post("/logout")
        assert login(client, next_url=evil).headers["Location"] == "/"


def test_login_rate_limit_per_account(app, client, factory):
    app.config["LOGIN_LIMIT"] = "3 per minute"
    factory.user("member@example.com")
    for n in range(3):  # each failure comes from another address: only the account limit bites
        resp = login(client, password="wrong", environ_base={"REMOTE_ADDR": f"10.0.0.{n}"})
        assert resp.status_code == 200
    resp = login(client, environ_base={"REMOTE_ADDR": "10.0.0.9"})  # even the right password
    assert resp.status_code == 429
    page = resp.get_data(as_text=True)
    assert "Too many failed login attempts" in page and "Slow down" in page
    assert not logged_in(client)


def test_login_rate_limit_per_ip(app, client, factory):
    app.config["LOGIN_LIMIT"] = "3 per minute"
    factory.user("member@example.com")
    for n in range(3):
        assert login(client, email=f"guess{n}@example.com").status_code == 200
    assert login(client).status_code == 429
    assert not logged_in(client)
    # Another address may still log in to the same account: that one is not locked.
    other = app.test_client()
    assert login(other, environ_base={"REMOTE_ADDR": "10.1.1.1"}).status_code == 302


def test_successful_logins_do_not_use_up_the_limit(app, client, factory):
    app.config["LOGIN_LIMIT"] = "3 per minute"
    factory.user("member@example.com")
    for _ in range(6):
        assert login(client).status_code == 302
        client.post("/logout")


def test_the_login_limiter_leaves_api_requests_alone(app, client):
    """Flask-Limiter's hooks after a request run for the console only: under /v1 they
    evaluated the request's limits where none applies (~17 us of every API request)."""
    from flask.globals import request_ctx
    with client:
        assert client.get("/login").status_code == 200
        assert hasattr(request_ctx._get_current_object(), "_limiter_request_context")
    with client:
        assert client.get("/v1/models").status_code == 401
        assert not hasattr(request_ctx._get_current_object(), "_limiter_request_context")


# --- change password ------------------------------------------------------------------------

def test_change_password(app, client, factory):
    factory.user("member@example.com")
    login(client)
    assert "Current password" in client.get("/account/password").get_data(as_text=True)
    resp = client.post("/account/password", data={
        "current": "wrong-password", "password": "new-password-1", "confirm": "new-password-1"})
    assert "That is not your current password." in resp.get_data(as_text=True)
    assert user_by_email(app, "member@example.com").check_password(PASSWORD)

    resp = client.post("/account/password", data={
        "current": PASSWORD, "password": "new-password-1", "confirm": "new-password-1"},
        follow_redirects=True)
    assert "Your password has been changed" in resp.get_data(as_text=True)
    client.post("/logout")
    assert "Wrong email or password." in login(client).get_data(as_text=True)
    assert login(client, password="new-password-1").status_code == 302


def test_a_new_password_signs_out_every_other_session(app, client, factory):
    factory.user("member@example.com")
    other = app.test_client()
    login(client)
    login(other)
    assert other.get("/keys").status_code == 200
    client.post("/account/password", data={
        "current": PASSWORD, "password": "new-password-1", "confirm": "new-password-1"})
    assert client.get("/keys").status_code == 200  # the session that changed it carries on
    resp = other.get("/keys")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login")


def test_change_password_needs_login(client):
    resp = client.get("/account/password")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login")


# --- CSRF -----------------------------------------------------------------------------------

def test_forms_without_csrf_token_are_refused_and_change_nothing(app, client, factory):
    app.config["WTF_CSRF_ENABLED"] = True
    factory.user("member@example.com")

    resp = register(client)
    assert resp.status_code == 400
    assert "CSRF" in resp.get_data(as_text=True)
    assert user_by_email(app, "new@example.com") is None

    assert login(client).status_code == 400
    assert not logged_in(client)

    # With the token from the page the same forms work.
    token = csrf_token(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"email": "member@example.com", "password": PASSWORD,
                                       "csrf_token": token})
    assert resp.status_code == 302 and logged_in(client)

    assert client.post("/logout").status_code == 400
    assert logged_in(client)
    resp = client.post("/account/password", data={
        "current": PASSWORD, "password": "new-password-1", "confirm": "new-password-1"})
    assert resp.status_code == 400
    assert user_by_email(app, "member@example.com").check_password(PASSWORD)

    token = csrf_token(client.get("/keys").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert not logged_in(client)


# --- admin pages and the shell --------------------------------------------------------------

def test_member_gets_403_on_admin_pages(app, client, factory):
    factory.user("member@example.com")
    factory.user("admin@example.com", is_admin=True)
    login(client)
    resp = client.get("/admin")
    assert resp.status_code == 403
    assert "You don't have access to this page" in resp.get_data(as_text=True)
    assert 'href="/admin"' not in client.get("/keys").get_data(as_text=True)

    admin = app.test_client()
    login(admin, email="admin@example.com")
    assert admin.get("/admin").status_code == 200
    assert 'href="/admin"' in admin.get("/keys").get_data(as_text=True)


def test_admin_required_guard(app, client, factory):
    app.add_url_rule("/_admin_only", "admin_only", admin_required(lambda: "secret"))
    factory.user("member@example.com")
    factory.user("admin@example.com", is_admin=True)
    resp = client.get("/_admin_only")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login")
    login(client)
    assert client.get("/_admin_only").status_code == 403
    admin = app.test_client()
    login(admin, email="admin@example.com")
    assert admin.get("/_admin_only").get_data(as_text=True) == "secret"


def test_error_pages_use_the_console_shell(client):
    resp = client.get("/no/such/page")
    assert resp.status_code == 404
    page = resp.get_data(as_text=True)
    assert "Page not found" in page and 'class="topbar"' in page and "style.css" in page


def test_shell_has_navigation_and_no_external_assets(app, client, factory):
    factory.user("member@example.com")
    login(client)
    page = client.get("/keys").get_data(as_text=True)
    for href in ("/", "/keys", "/wallet", "/logs", "/dashboard", "/pricing"):
        assert f'href="{href}"' in page
    assert 'aria-current="page">Keys' in page
    assert "http://" not in page.split("<body")[0] and "https://" not in page.split("<body")[0]
    css = client.get("/static/style.css").get_data(as_text=True)
    assert "@import" not in css and "url(http" not in css
    assert client.get("/static/app.js").status_code == 200


# --- session cookies ------------------------------------------------------------------------

def _session_cookie(response):
    return next(h for h in response.headers.getlist("Set-Cookie") if h.startswith("session="))


def test_session_cookie_is_secure_only_over_https(app, client, factory):
    factory.user("member@example.com")
    plain = login(client)
    assert "Secure" not in _session_cookie(plain) and "HttpOnly" in _session_cookie(plain)
    proxied = app.test_client().post("/login", data={
        "email": "member@example.com", "password": PASSWORD},
        headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in _session_cookie(proxied)
    direct = app.test_client().post("/login", base_url="https://gateway.example", data={
        "email": "member@example.com", "password": PASSWORD})
    assert "Secure" in _session_cookie(direct)
