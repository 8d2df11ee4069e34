"""API keys in the console: list, create (full key once), disable, enable, delete, ownership."""
import re
from datetime import timedelta

from extensions import db
from models import ApiKey, User, utcnow

PASSWORD = "password123"
FULL_KEY = re.compile(r"sk-[A-Za-z0-9]{48}")


def login(client, email="member@example.com"):
    resp = client.post("/login", data={"email": email, "password": PASSWORD})
    assert resp.status_code == 302
    return client


def keys_of(app, email="member@example.com"):
    with app.app_context():
        user = db.session.scalar(db.select(User).filter_by(email=email))
        return db.session.scalars(db.select(ApiKey).filter_by(user_id=user.id)
                                  .order_by(ApiKey.id)).all()


def get_key(app, key_id):
    with app.app_context():
        return db.session.get(ApiKey, key_id)


def create_key(client, name="laptop", **fields):
    data = {"name": name, "expires_days": "", "credit_limit": "", "models": "",
            "allowed_ips": "", "rpm": "0"}
    data.update(fields)
    return client.post("/keys", data=data)


def csrf_token(html):
    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html).group(1)


def test_keys_page_needs_login(client):
    resp = client.get("/keys")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login?next=%2Fkeys")
    assert client.post("/keys", data={"name": "x"}).status_code == 302


def test_empty_state_and_form(app, client, factory):
    factory.user()
    page = login(client).get("/keys").get_data(as_text=True)
    assert "You have no API keys yet." in page
    assert 'name="name"' in page and 'name="allowed_ips"' in page and 'name="credit_limit"' in page


def test_create_shows_full_key_once_then_only_its_prefix(app, client, factory):
    factory.user()
    login(client)
    resp = create_key(client)
    assert resp.status_code == 201

    page = resp.get_data(as_text=True)
    shown = FULL_KEY.findall(page)
    assert len(set(shown)) == 1
    full_key = shown[0]
    assert "It will <strong>not</strong> be shown again" in page
    assert 'class="copy' in page

    [key] = keys_of(app)
    assert key.name == "laptop"
    assert key.key_hash == ApiKey.hash_key(full_key)
    assert full_key not in (key.prefix, key.last4) and full_key.startswith(key.prefix)
    assert key.display == f"{full_key[:7]}…{full_key[-4:]}"

    # The key is in this one response only: not in any cookie, not on the next page view.
    assert all(full_key not in header and full_key[3:] not in header
               for header in resp.headers.getlist("Set-Cookie"))
    with client.session_transaction() as session:
        assert full_key not in str(dict(session))
    assert 'data-replace-url="/keys"' in page  # a reload becomes a GET of /keys
    again = client.get("/keys").get_data(as_text=True)
    assert FULL_KEY.search(again) is None
    assert full_key not in again
    assert key.display in again
    assert "enabled" in again and "shown once" not in again


def test_create_with_every_option(app, client, factory):
    factory.user()
    login(client)
    before = utcnow()
    create_key(client, name="ci", expires_days="7", credit_limit="2.5",
               models="gpt-4o-mini, claude-sonnet-4,", allowed_ips="10.0.0.0/8, 192.168.1.7",
               rpm="30")
    [key] = keys_of(app)
    assert key.credit_limit_micro == 2_500_000
    assert key.models == "gpt-4o-mini,claude-sonnet-4"
    assert key.allowed_ips == "10.0.0.0/8,192.168.1.7/32"
    assert key.rpm == 30
    assert before + timedelta(days=7) <= key.expires_at <= utcnow() + timedelta(days=7)

    page = client.get("/keys").get_data(as_text=True)
    assert "gpt-4o-mini, claude-sonnet-4" in page
    assert "10.0.0.0/8, 192.168.1.7/32" in page
    assert "0 / 2.5" in page


def test_create_rejects_bad_input_inline_and_creates_nothing(app, client, factory):
    factory.user()
    login(client)
    cases = [
        ({"name": ""}, "This field is required."),
        ({"credit_limit": "ten"}, "Enter an amount of credits"),
        ({"credit_limit": "0.0000001"}, "at most 6 decimal places"),
        ({"credit_limit": "-1"}, "must not be negative"),
        ({"allowed_ips": "10.0.0.0/8, 300.1.2.3"}, "&#39;300.1.2.3&#39; is not an IP address"),
        ({"expires_days": "0"}, "Number must be between 1 and 3650."),
        ({"rpm": "-5"}, "Number must be between 0 and 1000000."),
    ]
    for fields, message in cases:
        resp = create_key(client, **fields)
        assert resp.status_code == 400, fields
        page = resp.get_data(as_text=True)
        assert message in page, (fields, message)
        assert 'class="field has-error"' in page
    assert keys_of(app) == []


def test_status_shows_expired_and_spent_of_limit(app, client, factory):
    factory.user()
    factory.key("member@example.com", name="old", expires_at=utcnow() - timedelta(days=1),
                credit_limit_micro=5_000_000, spent_micro=1_250_000)
    page = login(client).get("/keys").get_data(as_text=True)
    assert '<span class="badge badge-warn">expired</span>' in page
    assert "1.25 / 5" in page


def test_disable_enable_delete_own_key(app, client, factory):
    factory.user()
    factory.key("member@example.com", name="laptop")
    [key] = keys_of(app)
    login(client)

    resp = client.post(f"/keys/{key.id}/disable", follow_redirects=True)
    assert "Key “laptop” is disabled." in resp.get_data(as_text=True)
    assert '<span class="badge badge-bad">disabled</span>' in resp.get_data(as_text=True)
    assert get_key(app, key.id).disabled

    client.post(f"/keys/{key.id}/enable")
    assert not get_key(app, key.id).disabled

    resp = client.post(f"/keys/{key.id}/delete", follow_redirects=True)
    assert "Key “laptop” is deleted." in resp.get_data(as_text=True)
    assert get_key(app, key.id) is None


def test_another_users_key_is_404_and_unchanged(app, client, factory):
    factory.user("owner@example.com")
    factory.user("member@example.com")
    factory.key("owner@example.com", name="owners", disabled=True)
    [key] = keys_of(app, "owner@example.com")
    login(client)
    for action in ("disable", "enable", "delete"):
        resp = client.post(f"/keys/{key.id}/{action}")
        assert resp.status_code == 404, action
        assert "Page not found" in resp.get_data(as_text=True)
    assert client.post("/keys/999999/disable").status_code == 404
    after = get_key(app, key.id)
    assert after is not None and after.disabled
    assert "owners" not in client.get("/keys").get_data(as_text=True)


def test_key_actions_need_csrf_token(app, client, factory):
    app.config["WTF_CSRF_ENABLED"] = True
    factory.user()
    factory.key("member@example.com", name="laptop")
    [key] = keys_of(app)
    token = csrf_token(client.get("/login").get_data(as_text=True))
    client.post("/login", data={"email": "member@example.com", "password": PASSWORD,
                                "csrf_token": token})

    assert client.post(f"/keys/{key.id}/disable").status_code == 400
    assert client.post(f"/keys/{key.id}/delete").status_code == 400
    assert create_key(client, name="sneaky").status_code == 400
    assert [k.name for k in keys_of(app)] == ["laptop"] and not get_key(app, key.id).disabled

    token = csrf_token(client.get("/keys").get_data(as_text=True))
    assert client.post(f"/keys/{key.id}/disable", data={"csrf_token": token}).status_code == 302
    assert get_key(app, key.id).disabled
    assert create_key(client, name="real", csrf_token=token).status_code == 201
    assert [k.name for k in keys_of(app)] == ["laptop", "real"]
