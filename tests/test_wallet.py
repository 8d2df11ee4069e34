"""The /wallet and /pricing console pages on SQLite and PostgreSQL."""
import re
from html import unescape

import pytest

import billing
import holds
from extensions import db
from models import MICRO, Group, LedgerEntry, User
from tests.support import login_session, make_price, make_user


@pytest.fixture
def member(app):
    """A logged-in-able member with a ledger: grant 10, charge 1.25 (request r-1), hold 2."""
    with app.app_context():
        uid = make_user("member@example.com")
        billing.grant_credits(uid, 10 * MICRO, note="welcome aboard")
        hold = holds.reserve_credits(uid, None, "r-1", 2 * MICRO)
        holds.settle_credits(hold, 1_250_000, note="gpt-4o-mini")
        db.session.commit()
        holds.reserve_credits(uid, None, "r-2", 2 * MICRO)  # still in flight
    yield uid
    with app.app_context():
        assert billing.check_ledger() == []


def text_of(response):
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", response.get_data(as_text=True))))


def stat(response, name):
    html = response.get_data(as_text=True)
    match = re.search(rf'id="stat-{name}".*?class="stat-value">([^<]*)<', html, re.S)
    return match.group(1).strip()


def test_wallet_shows_balance_reserved_available_and_the_ledger(client, member):
    login_session(client, member)
    response = client.get("/wallet")
    assert response.status_code == 200
    assert (stat(response, "balance"), stat(response, "reserved"),
            stat(response, "available")) == ("8.75", "2", "6.75")
    text = text_of(response)
    assert "charge -1.25 8.75 gpt-4o-mini r-1" in text
    assert "grant +10 10 welcome aboard" in text
    assert text.index("charge -1.25") < text.index("grant +10")  # newest first


def test_wallet_ledger_is_paginated(app, client):
    with app.app_context():
        uid = make_user("member@example.com")
        for n in range(1, 56):
            billing.grant_credits(uid, n, note=f"drip {n}")
    login_session(client, uid)
    first = text_of(client.get("/wallet"))
    assert "drip 55" in first and "drip 6 " in first and "drip 5 " not in first
    assert "Next" in first and "Page 1" in first
    second = text_of(client.get("/wallet?page=2"))
    assert "drip 5 " in second and "drip 1 " in second and "drip 6 " not in second


def test_wallet_with_no_history_says_so(app, client):
    with app.app_context():
        uid = make_user("member@example.com")
    login_session(client, uid)
    text = text_of(client.get("/wallet"))
    assert "No balance changes yet" in text


def test_redeem_a_code(app, client, member):
    with app.app_context():
        code = billing.create_codes(3_500_000, 1)[0]
    login_session(client, member)
    response = client.post("/wallet", data={"code": f"  {code} "}, follow_redirects=True)
    assert response.status_code == 200
    assert "Redeemed: 3.5 credits were added to your wallet." in text_of(response)
    assert stat(response, "balance") == "12.25"
    assert "redemption +3.5 12.25" in text_of(response)


@pytest.mark.parametrize("code, message", [
    ("", "Enter the code you were given."),
    ("not-a-code", "That redemption code does not exist. Check it for typos."),
    ("x" * 65, "Codes are at most 64 characters long."),
])
def test_redeem_form_errors(client, member, code, message):
    login_session(client, member)
    response = client.post("/wallet", data={"code": code})
    assert response.status_code == 400
    assert message in text_of(response)
    assert stat(response, "balance") == "8.75"


def test_redeem_used_and_expired_codes(app, client, member):
    from datetime import timedelta

    from models import utcnow
    with app.app_context():
        used = billing.create_codes(MICRO, 1)[0]
        billing.redeem_code(member, used)
        expired = billing.create_codes(MICRO, 1, expires_at=utcnow() - timedelta(days=1))[0]
    login_session(client, member)
    assert "already been used" in text_of(client.post("/wallet", data={"code": used}))
    assert "has expired" in text_of(client.post("/wallet", data={"code": expired}))
    with app.app_context():
        assert db.session.get(User, member).balance_micro == 9_750_000


def test_redeem_form_with_csrf_on(app, client, member):
    app.config["WTF_CSRF_ENABLED"] = True
    with app.app_context():
        code = billing.create_codes(MICRO, 1)[0]
    login_session(client, member)
    assert client.post("/wallet", data={"code": code}).status_code == 400  # no token
    page = client.get("/wallet").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    response = client.post("/wallet", data={"code": code, "csrf_token": token})
    assert response.status_code == 302
    with app.app_context():
        assert db.session.scalar(db.select(LedgerEntry.amount_micro)
                                 .filter_by(user_id=member, kind="redemption")) == MICRO


def test_pages_need_a_login(client):
    for path in ("/wallet", "/pricing"):
        response = client.get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_pricing_applies_the_group_multiplier_and_access(app, client):
    with app.app_context():
        db.session.add(Group(name="vip", models="gpt-4o,free-model", multiplier_ppm=1_500_000))
        db.session.commit()
        uid = make_user("member@example.com", group="vip")
        make_price("gpt-4o", input=2.5, output=10, cached_input=1.25, per_request=0.000001)
        make_price("claude-x", input=3, output=15)
        make_price("free-model", input=0, output=0)
    login_session(client, uid)
    response = client.get("/pricing")
    assert response.status_code == 200
    text = text_of(response)
    assert "vip" in text and "× 1.5" in text
    # 2.5 x 1.5 = 3.75, 10 x 1.5 = 15, 1.25 x 1.5 = 1.875, 0.000001 x 1.5 rounds up to 0.000002
    assert "gpt-4o 3.75 15 1.875 0.000002 available" in text
    assert "claude-x 4.5 22.5 4.5 0 not in your group" in text  # cached input = input price
    assert "free-model 0 0 0 0 available" in text


def test_pricing_with_no_prices(app, client):
    with app.app_context():
        uid = make_user("member@example.com")
    login_session(client, uid)
    text = text_of(client.get("/pricing"))
    assert "No model has a price yet" in text
    assert "× " not in text  # multiplier 1 is not mentioned
