"""The admin console (blueprints/admin) on SQLite and PostgreSQL, through the test client."""
import csv
import io
import json
import re
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from extensions import db
from models import (ApiKey, Channel, ChannelModel, Group, LedgerEntry, ModelPrice,
                    RedemptionCode, RequestLog, Reservation, Setting, User, utcnow)
from tests.support import free_port, login_session

UPSTREAM_KEY = "sk-upstream-very-secret-0123456789"
ADMIN = "admin@example.com"
MEMBER = "member@example.com"
SNAPSHOT_MODELS = (User, Group, Channel, ChannelModel, ModelPrice, LedgerEntry, RedemptionCode,
                   Setting, ApiKey)


# --- helpers ------------------------------------------------------------------------------


def login(client, user_id):
    """Log `user_id` in the way Flask-Login reads its session."""
    login_session(client, user_id)


@pytest.fixture
def admin(app, client, factory):
    """A logged-in admin; returns their user id."""
    user_id = factory.user(ADMIN, is_admin=True)
    login(client, user_id)
    return user_id


def snapshot(app):
    """Every row the admin pages touch, to prove a refused form changed nothing."""
    with app.app_context():
        db.session.expire_all()
        return {model.__tablename__: sorted(
            tuple(str(getattr(row, c.key)) for c in model.__table__.columns)
            for row in db.session.scalars(db.select(model))) for model in SNAPSHOT_MODELS}


def one(app, table, **filters):
    with app.app_context():
        return db.session.scalar(db.select(table).filter_by(**filters))


def count(app, table, **filters):
    with app.app_context():
        return len(db.session.scalars(db.select(table).filter_by(**filters)).all())


def refused(app, client, url, data, message):
    """POST must re-render with `message` inline (400) and change no row."""
    before = snapshot(app)
    response = client.post(url, data=data)
    html = response.get_data(as_text=True)
    assert response.status_code == 400, html[:500]
    assert message in html, html
    assert snapshot(app) == before
    return html


def field_error(html, message):
    """`message` shown as an inline field error, not only somewhere on the page."""
    errors = re.findall(r'<div class="field-error">(.*?)</div>', html, re.S)
    assert any(message in e for e in errors), errors


def channel_form(**overrides):
    data = {"name": "main", "type": "openai", "base_url": "https://api.openai.com",
            "api_key": UPSTREAM_KEY, "models": "gpt-4o-mini,fast=gpt-4o-mini",
            "priority": "0", "weight": "1", "enabled": "y"}
    data.update(overrides)
    return data


def flashes(client):
    """The flash messages the next page would show."""
    with client.session_transaction() as session:
        return [message for _, message in session.get("_flashes", [])]


# --- access -------------------------------------------------------------------------------

ADMIN_PAGES = ["/admin", "/admin/channels", "/admin/channels/new", "/admin/prices",
               "/admin/prices/set", "/admin/prices/set?model=gpt-4o-mini", "/admin/groups",
               "/admin/groups/new", "/admin/users", "/admin/users/new", "/admin/codes",
               "/admin/settings", "/admin/codes.csv"]


def admin_urls(app, ids):
    """(method, url) for every route of the admin blueprint, ids filled in from `ids`."""
    urls = []
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("admin."):
            continue
        values = {arg: ids[arg] for arg in rule.arguments}
        with app.test_request_context():
            from flask import url_for
            url = url_for(rule.endpoint, **values)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            urls.append((method, url))
    return urls


def test_every_page_renders_for_an_admin(app, client, admin, factory):
    channel_id = factory.channel("main", api_key=UPSTREAM_KEY, base_url="https://x.example")
    group_id = one(app, Group, name="default").id
    for url in ADMIN_PAGES + [f"/admin/channels/{channel_id}/edit",
                              f"/admin/groups/{group_id}/edit", f"/admin/users/{admin}"]:
        response = client.get(url)
        assert response.status_code == 200, url
    html = client.get("/admin").get_data(as_text=True)
    for link in ("/admin/channels", "/admin/prices", "/admin/groups", "/admin/users",
                 "/admin/codes", "/admin/settings"):
        assert f'href="{link}"' in html


def test_members_get_403_on_every_admin_url(app, client, factory):
    member = factory.user(MEMBER)
    channel_id = factory.channel("main", api_key=UPSTREAM_KEY, base_url="https://x.example")
    price_id = factory.price("gpt-4o-mini")
    factory.key(MEMBER)
    ids = {"channel_id": channel_id, "price_id": price_id, "user_id": member,
           "group_id": one(app, Group, name="default").id,
           "key_id": one(app, ApiKey, user_id=member).id}
    urls = admin_urls(app, ids)
    assert len(urls) >= 30
    login(client, member)
    before = snapshot(app)
    for method, url in urls:
        response = client.open(url, method=method, data={"name": "x", "amount": "5",
                                                          "password": "password123"})
        assert response.status_code == 403, (method, url)
    assert snapshot(app) == before


def test_anonymous_visitors_are_sent_to_login(client):
    response = client.get("/admin/channels")
    assert response.status_code == 302
    assert "/login" in response.headers["Location"]
    assert client.post("/admin/codes", data={"amount": "5", "count": "1"}).status_code == 302


def test_forms_need_a_csrf_token(app, client, admin):
    app.config["WTF_CSRF_ENABLED"] = True
    before = snapshot(app)
    response = client.post("/admin/channels/new", data=channel_form(type="mock", base_url=""))
    assert response.status_code == 400
    assert snapshot(app) == before
    page = client.get("/admin/channels/new").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    response = client.post("/admin/channels/new",
                           data=channel_form(type="mock", base_url="", csrf_token=token))
    assert response.status_code == 302
    channel = one(app, Channel, name="main")
    # The one-button forms (test, toggle, delete) carry the token too.
    page = client.get("/admin/channels").get_data(as_text=True)
    assert page.count('name="csrf_token"') >= 4
    assert client.post(f"/admin/channels/{channel.id}/toggle").status_code == 400
    assert one(app, Channel, name="main").enabled
    assert client.post(f"/admin/channels/{channel.id}/toggle",
                       data={"csrf_token": token}).status_code == 302
    assert not one(app, Channel, name="main").enabled


# --- channels -----------------------------------------------------------------------------


def test_add_channel_and_list_it_with_a_masked_key(app, client, admin):
    response = client.post("/admin/channels/new", data=channel_form(priority="5", weight="3"))
    assert response.status_code == 302
    channel = one(app, Channel, name="main")
    assert (channel.type, channel.base_url, channel.api_key) == (
        "openai", "https://api.openai.com", UPSTREAM_KEY)
    assert (channel.priority, channel.weight, channel.enabled) == (5, 3, True)
    assert channel.models_spec == "gpt-4o-mini,fast=gpt-4o-mini"
    html = client.get("/admin/channels").get_data(as_text=True)
    assert 'title="gpt-4o-mini,fast=gpt-4o-mini"' in html
    assert "<code>fast</code> <span class=\"muted\">→ gpt-4o-mini</span>" in html
    assert channel.masked_key in html
    assert "healthy" in html
    assert UPSTREAM_KEY not in html


def test_mock_channel_needs_no_base_url(app, client, admin):
    assert client.post("/admin/channels/new", data=channel_form(
        type="mock", base_url="", api_key="")).status_code == 302
    assert one(app, Channel, name="main").type == "mock"


def test_bad_channel_input_is_refused_inline(app, client, admin):
    for overrides, message in [
        ({"base_url": "ftp://api.example.com"}, "Enter an http:// or https:// URL"),
        ({"base_url": "api.openai.com"}, "Enter an http:// or https:// URL"),
        ({"base_url": ""}, "A base URL is required for this channel type."),
        ({"models": " , "}, "List at least one model"),
        ({"models": "a,=b"}, "is not “model” or “public=upstream”"),
        ({"models": "a,a=b"}, "Model “a” is listed twice."),
        ({"weight": "0"}, "Number must be between 1 and 10000."),
        ({"name": ""}, "This field is required."),
    ]:
        html = refused(app, client, "/admin/channels/new", channel_form(**overrides), message)
        field_error(html, message)


def test_duplicate_channel_name_is_refused(app, client, admin, factory):
    factory.channel("main", api_key="sk-first-key-000000", base_url="https://a.example")
    html = refused(app, client, "/admin/channels/new", channel_form(),
                   "A channel with this name already exists.")
    field_error(html, "A channel with this name already exists.")
    other = factory.channel("other", base_url="https://b.example")
    refused(app, client, f"/admin/channels/{other}/edit", channel_form(),
            "A channel with this name already exists.")


def test_edit_with_a_blank_key_keeps_the_old_key(app, client, admin, factory):
    channel_id = factory.channel("main", api_key=UPSTREAM_KEY, base_url="https://a.example",
                                 models="gpt-4o-mini,gpt-4o")
    page = client.get(f"/admin/channels/{channel_id}/edit").get_data(as_text=True)
    assert "gpt-4o-mini,gpt-4o" in page and UPSTREAM_KEY not in page
    # Keeping gpt-4o-mini while adding an alias must not collide with its own old row.
    response = client.post(f"/admin/channels/{channel_id}/edit", data=channel_form(
        name="renamed", api_key="", base_url="https://b.example/v1/",
        models="gpt-4o-mini,mini=gpt-4o-mini", priority="2", enabled=""))
    assert response.status_code == 302
    channel = one(app, Channel, id=channel_id)
    assert (channel.name, channel.api_key, channel.base_url, channel.priority) == (
        "renamed", UPSTREAM_KEY, "https://b.example/v1", 2)
    assert channel.enabled is False
    assert channel.models_spec == "gpt-4o-mini,mini=gpt-4o-mini"
    client.post(f"/admin/channels/{channel_id}/edit",
                data=channel_form(api_key="sk-new-key-9999999999"))
    assert one(app, Channel, id=channel_id).api_key == "sk-new-key-9999999999"


def test_enable_disable_and_delete(app, client, admin, factory):
    channel_id = factory.channel("main", base_url="https://a.example")
    client.post(f"/admin/channels/{channel_id}/toggle")
    assert one(app, Channel, id=channel_id).enabled is False
    assert "disabled" in client.get("/admin/channels").get_data(as_text=True)
    client.post(f"/admin/channels/{channel_id}/toggle")
    assert one(app, Channel, id=channel_id).enabled is True
    with app.app_context():
        db.session.add(RequestLog(request_id="req-1", channel_id=channel_id, channel_name="main",
                                  endpoint="chat", status="Success", http_status=200))
        db.session.commit()
    client.post(f"/admin/channels/{channel_id}/delete")
    assert one(app, Channel, id=channel_id) is None
    assert count(app, ChannelModel) == 0
    log = one(app, RequestLog, request_id="req-1")  # the log keeps the channel's name
    assert (log.channel_id, log.channel_name) == (channel_id, "main")


def test_health_badges_show_cooldown_and_errors(app, client, admin, factory):
    channel_id = factory.channel("main", base_url="https://a.example")
    with app.app_context():
        channel = db.session.get(Channel, channel_id)
        channel.fail_count = 3
        channel.cooldown_until = utcnow() + timedelta(minutes=5)
        channel.last_error = "HTTP 503: upstream overloaded"
        db.session.commit()
        until = channel.cooldown_until.strftime("%Y-%m-%d %H:%M:%S")
    html = client.get("/admin/channels").get_data(as_text=True)
    assert "cool-down" in html and until in html and "upstream overloaded" in html
    index = client.get("/admin").get_data(as_text=True)
    assert re.search(r'id="count-cooldown-channels">1<', index)
    assert re.search(r'id="count-active-channels">0<', index)


def test_test_button_on_a_mock_channel_records_latency_and_clears_failures(
        app, client, admin, factory):
    channel_id = factory.channel("main", type="mock", models="demo=mock-model")
    with app.app_context():
        channel = db.session.get(Channel, channel_id)
        channel.fail_count = 3
        channel.cooldown_until = utcnow() + timedelta(minutes=5)
        channel.last_error = "old failure"
        db.session.commit()
    response = client.post(f"/admin/channels/{channel_id}/test")
    assert response.status_code == 302
    assert any(re.search(r"Test of main: OK, demo answered in \d+ ms", m)
               for m in flashes(client))
    channel = one(app, Channel, id=channel_id)
    assert channel.last_test_ms is not None and channel.last_test_ms >= 0
    assert (channel.fail_count, channel.cooldown_until, channel.last_error) == (0, None, None)
    html = client.get("/admin/channels").get_data(as_text=True)
    assert f"{channel.last_test_ms} ms" in html and "healthy" in html


def test_test_button_reaches_every_provider_type(app, client, admin, factory, fake_upstream):
    for kind in ("openai", "anthropic", "gemini"):
        channel_id = factory.channel(kind, type=kind, base_url=fake_upstream.url,
                                     models=f"{kind}-model")
        client.post(f"/admin/channels/{channel_id}/test")
        assert any(m.startswith(f"Test of {kind}: OK, {kind}-model answered in")
                   for m in flashes(client)), (kind, flashes(client))
        assert one(app, Channel, id=channel_id).last_test_ms is not None


class _RejectingUpstream(BaseHTTPRequestHandler):
    """An upstream that refuses the key and, like some providers, echoes it back."""

    def do_POST(self):
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}",
                                     "type": "invalid_request_error",
                                     "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def rejecting_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RejectingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_test_button_shows_the_upstream_error_without_the_key(
        app, client, admin, factory, rejecting_upstream):
    channel_id = factory.channel("main", base_url=rejecting_upstream, api_key=UPSTREAM_KEY)
    client.post(f"/admin/channels/{channel_id}/test")
    messages = flashes(client)
    assert any("Test of main failed" in m and "Incorrect API key" in m for m in messages), messages
    assert not any(UPSTREAM_KEY in m for m in messages)
    channel = one(app, Channel, id=channel_id)
    assert "Incorrect API key" in channel.last_error and UPSTREAM_KEY not in channel.last_error
    html = client.get("/admin/channels").get_data(as_text=True)
    assert "Incorrect API key" in html and UPSTREAM_KEY not in html


def test_test_button_on_an_unreachable_channel_records_the_error(app, client, admin, factory):
    channel_id = factory.channel("main", base_url=f"http://127.0.0.1:{free_port()}")
    client.post(f"/admin/channels/{channel_id}/test")
    assert any("Test of main failed" in m for m in flashes(client))
    channel = one(app, Channel, id=channel_id)
    assert channel.last_error and channel.last_test_ms is None


def test_upstream_keys_never_appear_in_any_admin_page(app, client, admin, factory):
    factory.channel("main", api_key=UPSTREAM_KEY, base_url="https://a.example")
    ids = {"channel_id": one(app, Channel, name="main").id, "user_id": admin,
           "group_id": one(app, Group, name="default").id, "price_id": 1, "key_id": 1}
    for method, url in admin_urls(app, ids):
        if method == "GET":
            html = client.get(url).get_data(as_text=True)
            assert UPSTREAM_KEY not in html, url
            assert UPSTREAM_KEY[-12:] not in html, url
    # A refused edit re-renders the form: still no key in it.
    html = client.post(f"/admin/channels/{ids['channel_id']}/edit",
                       data=channel_form(base_url="nope", api_key="")).get_data(as_text=True)
    assert UPSTREAM_KEY not in html


# --- prices -------------------------------------------------------------------------------


def test_set_edit_and_delete_a_price(app, client, admin, factory):
    factory.channel("main", base_url="https://a.example", models="gpt-4o-mini,gpt-4o")
    html = client.get("/admin/prices").get_data(as_text=True)
    assert "model_price_missing" in html
    assert '/admin/prices/set?model=gpt-4o"' in html
    assert "/admin/prices/set?model=gpt-4o-mini" in html

    response = client.post("/admin/prices/set", data={
        "model": "gpt-4o-mini", "input": "0.15", "output": "0.6", "cached_input": "0.075",
        "per_request": ""})
    assert response.status_code == 302
    price = one(app, ModelPrice, model="gpt-4o-mini")
    assert (price.input_micro, price.output_micro, price.cached_input_micro,
            price.per_request_micro) == (150_000, 600_000, 75_000, 0)
    html = client.get("/admin/prices").get_data(as_text=True)
    assert "0.075" in html and "0.6" in html
    assert "/admin/prices/set?model=gpt-4o-mini" not in html.split('id="prices"')[0]

    form = client.get("/admin/prices/set?model=gpt-4o-mini").get_data(as_text=True)
    assert 'value="0.15"' in form and 'value="0.075"' in form
    client.post("/admin/prices/set", data={"model": "gpt-4o-mini", "input": "1", "output": "2",
                                           "cached_input": "", "per_request": "0.001"})
    price = one(app, ModelPrice, model="gpt-4o-mini")
    assert (price.input_micro, price.output_micro, price.cached_input_micro,
            price.per_request_micro) == (1_000_000, 2_000_000, None, 1000)
    assert count(app, ModelPrice) == 1

    client.post(f"/admin/prices/{price.id}/delete")
    assert count(app, ModelPrice) == 0


def test_a_price_change_reaches_the_billing_cache(app, client, admin):
    from billing import invalidate_prices, price_for
    app.config["CACHE_TTL"] = 300
    invalidate_prices()  # the cache is per process; start from what this database says
    with app.test_request_context():
        assert price_for("gpt-4o-mini") is None  # cached as unpriced
    client.post("/admin/prices/set", data={"model": "gpt-4o-mini", "input": "1", "output": "2"})
    with app.test_request_context():
        assert price_for("gpt-4o-mini").input_micro == 1_000_000


def test_bad_prices_are_refused_inline(app, client, admin):
    form = {"model": "gpt-4o-mini", "input": "1", "output": "2"}
    for data, field_message in [
        ({"input": "1.2345678"}, "at most 6 decimal places"),
        ({"output": "-1"}, "at most 6 decimal places"),
        ({"cached_input": "abc"}, "at most 6 decimal places"),
        ({"input": ""}, "This field is required."),
        ({"model": ""}, "This field is required."),
    ]:
        html = refused(app, client, "/admin/prices/set", {**form, **data}, field_message)
        field_error(html, field_message)


# --- groups -------------------------------------------------------------------------------


def test_create_and_edit_a_group(app, client, admin):
    response = client.post("/admin/groups/new", data={
        "name": "vip", "models": "gpt-4o, gpt-4o-mini", "rpm": "120", "tpm": "50000",
        "multiplier": "1.25"})
    assert response.status_code == 302
    group = one(app, Group, name="vip")
    assert (group.models, group.rpm, group.tpm, group.multiplier_ppm) == (
        "gpt-4o,gpt-4o-mini", 120, 50000, 1_250_000)
    html = client.get("/admin/groups").get_data(as_text=True)
    assert "× 1.25" in html
    assert 'value="1.25"' in client.get(f"/admin/groups/{group.id}/edit").get_data(as_text=True)
    client.post(f"/admin/groups/{group.id}/edit", data={
        "name": "vip", "models": "*", "rpm": "0", "tpm": "0", "multiplier": "0.5"})
    group = one(app, Group, name="vip")
    assert (group.models, group.rpm, group.tpm, group.multiplier_ppm) == ("*", 0, 0, 500_000)


def test_bad_group_input_is_refused_inline(app, client, admin):
    form = {"name": "vip", "models": "*", "rpm": "60", "tpm": "0", "multiplier": "1"}
    for data, message in [
        ({"multiplier": "-1"}, "Enter a non-negative decimal like 1 or 1.25"),
        ({"multiplier": "lots"}, "Enter a non-negative decimal like 1 or 1.25"),
        ({"rpm": "-5"}, "Number must be between 0 and 1000000."),
        ({"name": "default"}, "A group with this name already exists."),
        ({"models": " , "}, "Enter * or at least one model name."),
    ]:
        html = refused(app, client, "/admin/groups/new", {**form, **data}, message)
        field_error(html, message)


def test_default_group_cannot_be_renamed_or_deleted(app, client, admin):
    group = one(app, Group, name="default")
    refused(app, client, f"/admin/groups/{group.id}/edit",
            {"name": "renamed", "models": "*", "rpm": "60", "tpm": "0", "multiplier": "1"},
            "it cannot be renamed")
    client.post(f"/admin/groups/{group.id}/delete")
    assert one(app, Group, name="default") is not None


def test_a_group_with_members_is_not_deleted(app, client, admin, factory):
    client.post("/admin/groups/new", data={"name": "vip", "models": "*", "rpm": "60",
                                           "tpm": "0", "multiplier": "1"})
    factory.user(MEMBER, group="vip")
    group = one(app, Group, name="vip")
    client.post(f"/admin/groups/{group.id}/delete")
    assert "Group vip still has 1 member; move them to another group first." in flashes(client)
    assert one(app, Group, name="vip") is not None
    member = one(app, User, email=MEMBER)
    client.post(f"/admin/users/{member.id}/group", data={"group": "default"})
    client.post(f"/admin/groups/{group.id}/delete")
    assert one(app, Group, name="vip") is None


# --- users --------------------------------------------------------------------------------


def test_user_list_search_and_pagination(app, client, admin, factory):
    with app.app_context():  # rows straight in: 55 password hashes would take seconds
        group_id = db.session.scalar(db.select(Group.id).filter_by(name="default"))
        db.session.add_all(User(email=f"user{n:02d}@example.com", password_hash="!",
                                group_id=group_id) for n in range(55))
        db.session.commit()
    html = client.get("/admin/users").get_data(as_text=True)
    assert html.count('<tr data-email=') == 50 and 'rel="next"' in html
    html = client.get("/admin/users?page=2").get_data(as_text=True)
    assert html.count('<tr data-email=') == 6
    html = client.get("/admin/users?q=USER07").get_data(as_text=True)
    assert html.count('<tr data-email=') == 1 and "user07@example.com" in html
    assert "No user" in client.get("/admin/users?q=nobody").get_data(as_text=True)


def test_create_a_user(app, client, admin):
    client.post("/admin/groups/new", data={"name": "vip", "models": "*", "rpm": "60",
                                           "tpm": "0", "multiplier": "1"})
    response = client.post("/admin/users/new", data={
        "email": "New@Example.com", "password": "password123", "group": "vip", "is_admin": "y"})
    assert response.status_code == 302
    user = one(app, User, email="new@example.com")
    assert user.is_admin and user.group.name == "vip" and user.check_password("password123")
    refused(app, client, "/admin/users/new", {"email": "new@example.com",
                                              "password": "password123", "group": "default"},
            "a user with email new@example.com already exists")
    refused(app, client, "/admin/users/new", {"email": "x@example.com", "password": "short",
                                              "group": "default"},
            "Field must be at least 8 characters long.")
    refused(app, client, "/admin/users/new", {"email": "not-an-email", "password": "password123",
                                              "group": "default"}, "Invalid email address.")


def test_change_group_disable_and_admin_rights(app, client, admin, factory):
    member = factory.user(MEMBER)
    client.post("/admin/groups/new", data={"name": "vip", "models": "*", "rpm": "60",
                                           "tpm": "0", "multiplier": "1"})
    client.post(f"/admin/users/{member}/group", data={"group": "vip"})
    assert one(app, User, id=member).group.name == "vip"
    refused(app, client, f"/admin/users/{member}/group", {"group": "nope"}, "Not a valid choice")

    client.post(f"/admin/users/{member}/toggle-disabled")
    assert one(app, User, id=member).disabled is True
    client.post(f"/admin/users/{member}/toggle-disabled")
    assert one(app, User, id=member).disabled is False

    client.post(f"/admin/users/{member}/toggle-admin")
    assert one(app, User, id=member).is_admin is True
    client.post(f"/admin/users/{member}/toggle-admin")
    assert one(app, User, id=member).is_admin is False


def test_an_admin_cannot_disable_themselves(app, client, admin):
    html = refused(app, client, f"/admin/users/{admin}/toggle-disabled", {},
                   "You cannot disable your own account.")
    assert 'id="user-error"' in html
    assert one(app, User, id=admin).disabled is False


def test_the_last_admin_keeps_admin_rights(app, client, admin, factory):
    refused(app, client, f"/admin/users/{admin}/toggle-admin", {},
            "This is the last admin; make someone else an admin first.")
    other = factory.user("other@example.com", is_admin=True)
    client.post(f"/admin/users/{other}/toggle-admin")
    assert one(app, User, id=other).is_admin is False
    assert one(app, User, id=admin).is_admin is True


def test_balance_credit_and_deduct_write_the_ledger(app, client, admin, factory):
    member = factory.user(MEMBER)
    response = client.post(f"/admin/users/{member}/balance", data={
        "direction": "credit", "amount": "12.5", "note": "welcome"})
    assert response.status_code == 302
    assert one(app, User, id=member).balance_micro == 12_500_000
    client.post(f"/admin/users/{member}/balance", data={"direction": "deduct", "amount": "2.5",
                                                        "note": "correction"})
    assert one(app, User, id=member).balance_micro == 10_000_000
    with app.app_context():
        rows = db.session.scalars(db.select(LedgerEntry).filter_by(user_id=member)
                                  .order_by(LedgerEntry.id)).all()
        assert [(r.kind, r.amount_micro, r.note, r.created_by_id) for r in rows] == [
            ("grant", 12_500_000, "welcome", admin),
            ("adjustment", -2_500_000, "correction", admin)]
    html = client.get(f"/admin/users/{member}").get_data(as_text=True)
    assert "welcome" in html and "correction" in html and "+12.5" in html


def test_bad_balance_changes_are_refused_inline(app, client, admin, factory):
    member = factory.user(MEMBER, credits=10)
    for data, message in [
        ({"direction": "deduct", "amount": "10.000001"}, "cannot deduct 10.000001 credits"),
        ({"direction": "credit", "amount": "0"}, "Enter an amount above zero."),
        ({"direction": "credit", "amount": "1.2345678"}, "at most 6 decimal places"),
        ({"direction": "credit", "amount": "-3"}, "at most 6 decimal places"),
    ]:
        html = refused(app, client, f"/admin/users/{member}/balance", data, message)
        field_error(html, message)
        assert one(app, User, id=member).balance_micro == 10_000_000


def test_set_a_users_password(app, client, admin, factory):
    member = factory.user(MEMBER)
    assert client.post(f"/admin/users/{member}/password",
                       data={"password": "a-new-password"}).status_code == 302
    assert one(app, User, id=member).check_password("a-new-password")
    html = refused(app, client, f"/admin/users/{member}/password", {"password": "short"},
                   "Field must be at least 8 characters long.")
    field_error(html, "Field must be at least 8 characters long.")


def test_manage_a_users_keys(app, client, admin, factory):
    member = factory.user(MEMBER)
    response = client.post(f"/admin/users/{member}/keys", data={
        "name": "ci", "credit_limit": "5", "models": "gpt-4o-mini", "expires_days": "30",
        "allowed_ips": "10.0.0.0/8", "rpm": "10"})
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    full_key = re.search(r'id="new-key".*?<pre class="code">(sk-[^<]+)</pre>', html, re.S).group(1)
    key = one(app, ApiKey, user_id=member)
    assert key.hash_key(full_key) == key.key_hash
    assert (key.name, key.credit_limit_micro, key.models, key.allowed_ips, key.rpm) == (
        "ci", 5_000_000, "gpt-4o-mini", "10.0.0.0/8", 10)
    page = client.get(f"/admin/users/{member}").get_data(as_text=True)
    assert full_key not in page and key.display in page  # shown once, then only the prefix

    refused(app, client, f"/admin/users/{member}/keys", {"name": "ci"},
            f"{MEMBER} already has a key with this name.")
    refused(app, client, f"/admin/users/{member}/keys", {"name": "x", "allowed_ips": "nope"},
            "is not an IP address or CIDR range")

    client.post(f"/admin/users/{member}/keys/{key.id}/toggle")
    assert one(app, ApiKey, id=key.id).disabled is True
    client.post(f"/admin/users/{member}/keys/{key.id}/toggle")
    assert one(app, ApiKey, id=key.id).disabled is False
    # A key is reached only through its own user.
    assert client.post(f"/admin/users/{admin}/keys/{key.id}/delete").status_code == 404
    client.post(f"/admin/users/{member}/keys/{key.id}/delete")
    assert one(app, ApiKey, id=key.id) is None


def test_billing_check_and_sweep_from_the_console(app, client, admin, factory):
    member = factory.user(MEMBER, credits=10)
    client.post("/admin/billing/check")
    assert "Ledger OK: balances match the ledger for all 2 users." in flashes(client)
    with app.app_context():
        user = db.session.get(User, member)
        user.balance_micro += 1  # drift: a balance change without a ledger row
        user.reserved_micro = 3_000_000
        db.session.add(Reservation(request_id="req-dead", user_id=member,
                                   amount_micro=3_000_000,
                                   created_at=utcnow() - timedelta(days=1),
                                   lease_until=utcnow() - timedelta(days=1)))
        db.session.commit()
    client.post("/admin/billing/check")
    assert any(m.startswith("Ledger drift found:") and MEMBER in m for m in flashes(client))
    client.post("/admin/billing/sweep")
    assert any(m.startswith("Settled 1 hold whose worker stopped") for m in flashes(client))
    assert one(app, User, id=member).reserved_micro == 0
    assert count(app, Reservation) == 0


# --- codes --------------------------------------------------------------------------------


def test_generate_codes_list_filter_and_export(app, client, admin, factory):
    from billing import redeem_code
    response = client.post("/admin/codes", data={"amount": "2.5", "count": "3",
                                                 "expires_days": "7"})
    assert response.status_code == 302
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Created 3 codes worth 2.5 credits each." in html
    with app.app_context():
        rows = db.session.scalars(db.select(RedemptionCode)).all()
        codes = sorted(r.code for r in rows)
        batch = rows[0].batch
        assert {r.amount_micro for r in rows} == {2_500_000}
        assert all(r.expires_at > utcnow() + timedelta(days=6) for r in rows)
        assert {r.created_by_id for r in rows} == {admin}
    block = re.search(r'id="new-codes-list">(.*?)</pre>', html, re.S).group(1)
    assert sorted(re.findall(r"[0-9a-f]{32}", block)) == codes
    assert f"/admin/codes.csv?batch={batch}" in html
    # Shown once: the next visit lists them but without the copy block.
    assert 'id="new-codes-list"' not in client.get("/admin/codes").get_data(as_text=True)

    member = factory.user(MEMBER)
    with app.app_context():
        redeem_code(member, codes[0])
        expired = RedemptionCode(code="e" * 32, amount_micro=1, batch="old",
                                 expires_at=utcnow() - timedelta(days=1))
        db.session.add(expired)
        db.session.commit()
    html = client.get("/admin/codes?status=redeemed").get_data(as_text=True)
    assert codes[0] in html and f"by {MEMBER}" in html and codes[1] not in html
    html = client.get("/admin/codes?status=unused").get_data(as_text=True)
    assert codes[1] in html and codes[0] not in html and "e" * 32 not in html
    html = client.get("/admin/codes?status=expired").get_data(as_text=True)
    assert "e" * 32 in html and codes[1] not in html
    html = client.get(f"/admin/codes?batch={batch}").get_data(as_text=True)
    assert all(c in html for c in codes) and "e" * 32 not in html

    response = client.get(f"/admin/codes.csv?batch={batch}")
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert sorted(r["code"] for r in rows) == codes
    redeemed = next(r for r in rows if r["code"] == codes[0])
    assert (redeemed["status"], redeemed["redeemed_by"], redeemed["credits"]) == (
        "redeemed", MEMBER, "2.5")
    rows = list(csv.DictReader(io.StringIO(client.get("/admin/codes.csv").get_data(as_text=True))))
    assert sorted(r["code"] for r in rows) == codes[1:]


def test_bad_code_batches_are_refused_inline(app, client, admin):
    form = {"amount": "5", "count": "3", "expires_days": ""}
    for data, message in [
        ({"amount": "0"}, "A code must be worth more than zero."),
        ({"amount": "1.2345678"}, "at most 6 decimal places"),
        ({"count": "0"}, "Number must be between 1 and 1000."),
        ({"expires_days": "0"}, "Number must be between 1 and 3650."),
    ]:
        html = refused(app, client, "/admin/codes", {**form, **data}, message)
        field_error(html, message)


# --- settings -----------------------------------------------------------------------------


def test_settings_are_saved(app, client, admin):
    html = client.get("/admin/settings").get_data(as_text=True)
    assert 'value="4096"' in html
    response = client.post("/admin/settings", data={
        "registration": "invite", "signup_bonus": "2.5", "default_output_cap": "1024"})
    assert response.status_code == 302
    with app.app_context():
        assert Setting.get("registration") == "invite"
        assert Setting.get("signup_bonus_micro") == "2500000"
        assert Setting.get("default_output_cap") == "1024"
    html = client.get("/admin/settings").get_data(as_text=True)
    assert 'value="2.5"' in html and 'value="1024"' in html
    assert re.search(r'<option selected value="invite">|<option value="invite" selected', html)


def test_bad_settings_are_refused_inline(app, client, admin):
    form = {"registration": "open", "signup_bonus": "0", "default_output_cap": "4096"}
    for data, message in [
        ({"registration": "everyone"}, "Not a valid choice"),
        ({"signup_bonus": "1.0000001"}, "at most 6 decimal places"),
        ({"signup_bonus": "-1"}, "at most 6 decimal places"),
        ({"default_output_cap": "0"}, "Number must be between 1 and 10000000."),
    ]:
        html = refused(app, client, "/admin/settings", {**form, **data}, message)
        field_error(html, message)


def test_settings_show_the_environment_without_secrets(app, client, admin):
    html = client.get("/admin/settings").get_data(as_text=True)
    dialect = "sqlite" if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite") \
        else "postgresql"
    assert dialect in html and "off" in html
    assert app.config["SQLALCHEMY_DATABASE_URI"] not in html
    assert "SECRET" not in html and "postgres@" not in html
