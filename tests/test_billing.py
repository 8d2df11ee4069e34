"""billing.py and cli/billing.py on SQLite and PostgreSQL: prices, cost math, grants, codes,
the ledger audit and the CLI (holds: tests/test_holds.py)."""
import json
import random
from datetime import timedelta
from fractions import Fraction

import pytest
from sqlalchemy import update

import billing
import holds
from billing import Price
from extensions import db
from models import MICRO, ApiKey, LedgerEntry, ModelPrice, RedemptionCode, RequestLog, Reservation, \
    User, utcnow
from tests.support import balances, key_row, make_key, make_price, make_user


def exact_cost(price, prompt, completion, cached, multiplier_ppm):
    """SPEC §9 with exact fractions, independent of billing.cost_micro."""
    per_token = Fraction(1, 1_000_000)
    credits_micro = ((prompt - cached) * price.input_micro * per_token
                     + cached * price.cached_input_micro * per_token
                     + completion * price.output_micro * per_token
                     + price.per_request_micro)
    return credits_micro * Fraction(multiplier_ppm, MICRO)


def ceil(fraction):
    return -(-fraction.numerator // fraction.denominator)


# --- cost math (pure) -----------------------------------------------------------------------

def test_cost_with_cached_tokens_per_request_and_multiplier():
    # 2.5 / 10 / 1.25 credits per 1M tokens, 0.001 credit per request, multiplier 1.5.
    price = Price("m", 2_500_000, 10_000_000, 1_250_000, 1_000)
    # (600*2.5 + 400*1.25 + 500*10) / 1M credits = 7000 micro, + 1000 per request, x 1.5
    assert billing.cost_micro(price, 1000, 500, 400, 1_500_000) == 12_000


def test_cost_rounds_up_once_per_request_not_per_component():
    half = Price("m", 500_000, 500_000, 500_000, 0)  # half a micro-credit per token
    assert billing.cost_micro(half, 1, 1, 0, MICRO) == 1  # 0.5 + 0.5, not 1 + 1
    assert billing.cost_micro(half, 1, 0, 0, MICRO) == 1  # 0.5 rounds up
    tiny = Price("m", 1, 0, 0, 0)  # 1 micro-credit per 1M tokens
    assert billing.cost_micro(tiny, 1, 0, 0, MICRO) == 1
    assert billing.cost_micro(tiny, 1_000_000, 0, 0, MICRO) == 1
    assert billing.cost_micro(tiny, 1_000_001, 0, 0, MICRO) == 2
    one = Price("m", MICRO, 0, 0, 0)  # 1 micro-credit per token
    assert billing.cost_micro(one, 1, 0, 0, 1_000_001) == 2  # 1.000001 rounds up


def test_cost_edges():
    price = Price("m", 3_000_000, 15_000_000, 300_000, 0)
    assert billing.cost_micro(price, 0, 0, 0, MICRO) == 0
    assert billing.cost_micro(Price("free", 0, 0, 0, 0), 10**6, 10**6, 0, MICRO) == 0
    # cached tokens can never exceed the prompt they are part of
    assert billing.cost_micro(price, 10, 0, 50, MICRO) == billing.cost_micro(price, 10, 0, 10, MICRO)
    assert billing.cost_micro(price, 1000, 0, 0, 0) == 0  # multiplier 0 = free group
    huge = billing.cost_micro(price, 10**9, 10**9, 0, 3 * MICRO)
    assert huge == 3 * (10**9 * 3 + 10**9 * 15) and isinstance(huge, int)


def test_cache_writes_images_and_audio_seconds_are_priced():
    """Finding 8: cache writes were billed as plain input; images and seconds not at all."""
    price = Price("m", input_micro=3_000_000, output_micro=15_000_000,
                  cached_input_micro=300_000, per_request_micro=1_000,
                  cache_write_micro=3_750_000, per_image_micro=40_000, per_second_micro=100)
    # 1000 prompt tokens: 200 read from cache, 500 written to it, 300 plain; 100 output.
    cost = billing.cost_micro(price, 1000, 100, 200, MICRO, cache_write_tokens=500)
    assert cost == (300 * 3 + 200 * 0.3 + 500 * 3.75 + 100 * 15) + 1_000
    assert billing.cost_micro(price, 0, 0, 0, MICRO, images=3) == 1_000 + 3 * 40_000
    assert billing.cost_micro(price, 0, 0, 0, 2 * MICRO, seconds=61) == 2 * (1_000 + 6_100)
    # writes can never exceed the prompt that is left after cache reads
    assert billing.cost_micro(price, 10, 0, 8, MICRO, cache_write_tokens=50) == \
        billing.cost_micro(price, 10, 0, 8, MICRO, cache_write_tokens=2)
    # garbage counts cost nothing rather than crashing
    assert billing.cost_micro(price, "12", -5, None, MICRO, images=-1, seconds=1.5) == 1_000


def test_a_hold_covers_any_mix_of_cache_reads_and_writes():
    price = Price("m", 1_000_000, 2_000_000, 3_000_000, 0, cache_write_micro=2_500_000,
                  per_image_micro=10, per_second_micro=7)
    hold = billing.hold_micro(price, 1000, 50, MICRO, images=2, seconds=9)
    for cached in (0, 400, 1000):
        for written in (0, 300, 1000 - cached):
            assert billing.cost_micro(price, 1000, 50, cached, MICRO, written, 2, 9) <= hold


def test_hold_estimate_is_an_upper_bound_of_any_final_cost():
    price = Price("m", 2_000_000, 8_000_000, 500_000, 2_000)
    hold = billing.hold_micro(price, 1200, 4096, 1_250_000)
    assert hold == ceil(exact_cost(price, 1200, 4096, 0, 1_250_000))
    for cached in (0, 600, 1200):
        for out in (0, 100, 4096):
            assert billing.cost_micro(price, 1200, out, cached, 1_250_000) <= hold
    pricey_cache = Price("m", 1_000_000, 0, 3_000_000, 0)  # cache reads dearer than input
    hold = billing.hold_micro(pricey_cache, 100, 0, MICRO)
    assert billing.cost_micro(pricey_cache, 100, 0, 100, MICRO) <= hold


def test_ten_thousand_random_costs_match_exact_fractions():
    rng = random.Random(4)
    for _ in range(10_000):
        price = Price("m", rng.randrange(0, 80_000_000), rng.randrange(0, 200_000_000),
                      rng.randrange(0, 40_000_000), rng.choice((0, 0, 1, 777, 10_000)))
        prompt = rng.randrange(0, 200_000)
        cached = rng.randrange(0, prompt + 1)
        completion = rng.randrange(0, 50_000)
        ppm = rng.choice((MICRO, 1_500_000, 333_333, 2_718_281, 1))
        assert billing.cost_micro(price, prompt, completion, cached, ppm) == ceil(
            exact_cost(price, prompt, completion, cached, ppm))


# --- prices -------------------------------------------------------------------------------

def test_price_for_reads_rows_and_caches_with_invalidation(ctx):
    assert billing.price_for("gpt-x") is None
    make_price("gpt-x", input=1.5, output=6, cached_input=None, per_request=0.01)
    price = billing.price_for("gpt-x")
    assert price == Price("gpt-x", 1_500_000, 6_000_000, 1_500_000, 10_000, 1_500_000)
    ctx.config["CACHE_TTL"] = 60
    try:
        billing.invalidate_prices()
        assert billing.price_for("gpt-x").input_micro == 1_500_000
        # Another process changes the row (no ORM flush in this one): the cache holds until TTL.
        db.session.execute(update(ModelPrice).where(ModelPrice.model == "gpt-x")
                           .values(input_micro=9_000_000))
        db.session.commit()
        assert billing.price_for("gpt-x").input_micro == 1_500_000
        # A change through the ORM in this process clears the cache at once.
        make_price("gpt-x", input=7, output=9)
        assert billing.price_for("gpt-x").input_micro == 7_000_000
        billing.set_price("gpt-x", 2_000_000, 4_000_000, 500_000, 0)  # this process: invalidated
        assert billing.price_for("gpt-x") == Price("gpt-x", 2_000_000, 4_000_000, 500_000, 0,
                                                   2_000_000)
        assert billing.delete_price("gpt-x") is True
        assert billing.price_for("gpt-x") is None
        assert billing.delete_price("gpt-x") is False
    finally:
        ctx.config["CACHE_TTL"] = 0
        billing.invalidate_prices()


def test_set_price_refuses_negative_prices(ctx):
    with pytest.raises(ValueError):
        billing.set_price("m", -1, 0)
    with pytest.raises(ValueError):
        billing.set_price("  ", 1, 0)


# --- grants and codes -----------------------------------------------------------------------

def test_grant_and_deduct(ctx):
    admin = make_user("admin@example.com", is_admin=True)
    uid = make_user("a@example.com")
    entry = billing.grant_credits(uid, 5 * MICRO, note="welcome", created_by_id=admin)
    assert (entry.kind, entry.amount_micro, entry.balance_after_micro) == ("grant", 5 * MICRO,
                                                                           5 * MICRO)
    assert entry.created_by_id == admin
    hold = holds.reserve_credits(uid, None, "r", 2 * MICRO)
    with pytest.raises(ValueError, match="available balance is 3"):
        billing.grant_credits(uid, -4 * MICRO, kind="adjustment")
    entry = billing.grant_credits(uid, -3 * MICRO, kind="adjustment", note="oops")
    assert entry.balance_after_micro == 2 * MICRO
    assert balances(uid) == (2 * MICRO, 2 * MICRO)
    holds.release_credits(hold)
    refund = billing.grant_credits(uid, 1, kind="refund")
    assert refund.balance_after_micro == 2 * MICRO + 1
    with pytest.raises(ValueError):
        billing.grant_credits(uid, 0)
    with pytest.raises(ValueError):
        billing.grant_credits(uid, 5, kind="charge")
    with pytest.raises(ValueError, match="no such user"):
        billing.grant_credits(99_999, -5)


def test_codes_redeem_once_and_explain_failures(ctx):
    uid = make_user("a@example.com")
    codes = billing.create_codes(2_500_000, 3)
    assert len(set(codes)) == 3
    batch = {c.batch for c in db.session.scalars(db.select(RedemptionCode))}
    assert len(batch) == 1
    assert billing.redeem_code(uid, "  " + codes[0].upper() + "\n") == 2_500_000
    assert balances(uid) == (2_500_000, 0)
    entry = db.session.scalar(db.select(LedgerEntry).filter_by(kind="redemption"))
    assert entry.amount_micro == 2_500_000 and codes[0][:6] in entry.note
    with pytest.raises(ValueError, match="already been used"):
        billing.redeem_code(uid, codes[0])
    with pytest.raises(ValueError, match="does not exist"):
        billing.redeem_code(uid, "nope")
    with pytest.raises(ValueError, match="Enter"):
        billing.redeem_code(uid, "  ")
    expired = billing.create_codes(MICRO, 1, expires_at=utcnow() - timedelta(seconds=1))[0]
    with pytest.raises(ValueError, match="expired"):
        billing.redeem_code(uid, expired)
    assert balances(uid) == (2_500_000, 0)
    with pytest.raises(ValueError):
        billing.create_codes(0, 1)
    with pytest.raises(ValueError):
        billing.create_codes(MICRO, 0)


def test_a_failed_redemption_discards_the_callers_pending_rows(ctx):
    from bootstrap import create_user
    create_user("new@example.com", "password123")  # registration: pending, not committed
    with pytest.raises(ValueError):
        billing.redeem_code(None, "unknown-code")
    assert db.session.scalar(db.select(User).filter_by(email="new@example.com")) is None


# --- the audit ------------------------------------------------------------------------------

def test_check_ledger_detects_every_kind_of_drift(ctx):
    uid = make_user("a@example.com", credits=5)
    kid = key_row(make_key("a@example.com", name="ci")).id
    hold = holds.reserve_credits(uid, kid, "r", MICRO)
    assert billing.check_ledger() == []
    db.session.execute(db.update(User).filter_by(id=uid).values(balance_micro=6 * MICRO))
    db.session.commit()
    lines = billing.check_ledger()
    assert lines == ["user a@example.com: balance 6 but the ledger sums to 5 (drift 1)"]
    db.session.execute(db.update(User).filter_by(id=uid).values(balance_micro=5 * MICRO,
                                                                 reserved_micro=0))
    db.session.execute(db.update(ApiKey).filter_by(id=kid).values(reserved_micro=7))
    db.session.commit()
    lines = billing.check_ledger()
    assert len(lines) == 2
    assert "reserved 0 but open reservations hold 1" in lines[0]
    assert lines[1].startswith("key 'ci'") and "reserved 0.000007" in lines[1]
    db.session.execute(db.update(User).filter_by(id=uid).values(reserved_micro=MICRO))
    db.session.execute(db.update(ApiKey).filter_by(id=kid).values(reserved_micro=MICRO))
    db.session.commit()
    holds.release_credits(hold)


# --- the legacy OpenAI billing endpoints ------------------------------------------------------

def test_subscription_and_usage_bodies(ctx):
    uid = make_user("a@example.com", credits=10)
    full = make_key("a@example.com")
    limited_full = make_key("a@example.com", name="capped", credit_limit_micro=2_500_000,
                            expires_at=utcnow().replace(microsecond=0) + timedelta(days=1))
    hold = holds.reserve_credits(uid, None, "r1", 3 * MICRO)
    holds.settle_credits(hold, 1_234_567)
    key = key_row(full)
    db.session.add(RequestLog(request_id="r1", user_id=uid, key_id=key.id, endpoint="chat",
                              credits_micro=1_234_567, status="Success", http_status=200))
    db.session.commit()
    user = db.session.get(User, uid)
    body = billing.subscription_summary(user, key)
    assert body == {"object": "billing_subscription", "has_payment_method": True,
                    "soft_limit_usd": 10, "hard_limit_usd": 10, "system_hard_limit_usd": 10,
                    "access_until": 0}
    capped = key_row(limited_full)
    body = billing.subscription_summary(user, capped)
    assert body["hard_limit_usd"] == 2.5
    assert body["access_until"] > 0
    today = utcnow().date()
    usage = billing.usage_total(user, key, today.isoformat(),
                                (today + timedelta(days=1)).isoformat())
    assert usage == {"object": "list", "total_usage": 123.4567}  # hundredths of a credit
    assert billing.usage_total(user, capped, today, today + timedelta(days=1))["total_usage"] == 0
    assert billing.usage_total(user, key, "2000-01-01", "2000-02-01")["total_usage"] == 0
    with pytest.raises(ValueError):
        billing.usage_total(user, key, "yesterday", "2000-01-01")
    with pytest.raises(ValueError):
        billing.usage_total(user, key, "2000-02-01", "2000-01-01")
    assert json.loads(json.dumps(body))["hard_limit_usd"] == 2.5


def lapse_lease(request_id, seconds):
    """Make a hold look like its worker died `seconds` ago."""
    past = utcnow() - timedelta(seconds=seconds)
    db.session.execute(db.update(Reservation).filter_by(request_id=request_id)
                       .values(created_at=past, lease_until=past))
    db.session.commit()


# --- CLI ----------------------------------------------------------------------------------------

def run(runner, *args):
    return runner.invoke(args=list(args))


def test_cli_prices(app, runner):
    result = run(runner, "prices", "set", "gpt-4o", "--input", "2.5", "--output", "10",
                 "--cached-input", "1.25", "--per-request", "0.000001")
    assert result.exit_code == 0, result.output
    assert "input 2.5, output 10, cached input 1.25" in result.output
    run(runner, "prices", "set", "free-model", "--input", "0", "--output", "0")
    result = run(runner, "prices", "list", "--json")
    rows = {r["model"]: r for r in json.loads(result.output)}
    assert rows["gpt-4o"]["input_micro"] == 2_500_000
    assert rows["gpt-4o"]["cached_input"] == "1.25"
    assert rows["gpt-4o"]["per_request_micro"] == 1
    assert rows["free-model"]["output"] == "0"
    assert "gpt-4o  input=2.5" in run(runner, "prices", "list").output
    with app.app_context():
        assert billing.price_for("gpt-4o") == Price("gpt-4o", 2_500_000, 10_000_000, 1_250_000, 1,
                                                    2_500_000)
    result = run(runner, "prices", "set", "dall-e", "--input", "0", "--output", "0",
                 "--cache-write", "3.125", "--per-image", "0.04", "--per-second", "0.0001")
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads(run(runner, "prices", "list", "--json").output)}
    assert (rows["dall-e"]["cache_write"], rows["dall-e"]["per_image_micro"],
            rows["dall-e"]["per_second_micro"]) == ("3.125", 40_000, 100)
    with app.app_context():
        assert billing.price_for("dall-e") == Price("dall-e", 0, 0, 0, 0, 3_125_000, 40_000, 100)
    result = run(runner, "prices", "set", "x", "--input", "1.2345678", "--output", "1")
    assert result.exit_code != 0 and "at most 6 decimal places" in result.output
    result = run(runner, "prices", "set", "x", "--input", "-1", "--output", "1")
    assert result.exit_code != 0 and "negative" in result.output
    assert run(runner, "prices", "delete", "free-model").exit_code == 0
    result = run(runner, "prices", "delete", "free-model")
    assert result.exit_code != 0 and "no price for model free-model" in result.output


def test_cli_credits_grant_and_deduct(app, runner):
    with app.app_context():
        make_user("a@example.com")
    result = run(runner, "credits", "grant", "A@example.com", "12.5", "--note", "hello")
    assert result.exit_code == 0, result.output
    assert "granted 12.5 credits to a@example.com; balance is now 12.5" in result.output
    result = run(runner, "credits", "grant", "a@example.com", "-2.25")
    assert result.exit_code == 0, result.output
    assert "deducted 2.25 credits from a@example.com; balance is now 10.25" in result.output
    result = run(runner, "credits", "grant", "a@example.com", "-11")
    assert result.exit_code != 0 and "available balance is 10.25" in result.output
    result = run(runner, "credits", "grant", "a@example.com", "1.2345678")
    assert result.exit_code != 0 and "at most 6 decimal places" in result.output
    result = run(runner, "credits", "grant", "nobody@example.com", "1")
    assert result.exit_code != 0 and "no user with email nobody@example.com" in result.output
    result = run(runner, "credits", "grant", "a@example.com", "lots")
    assert result.exit_code != 0 and "not a number" in result.output
    with app.app_context():
        kinds = [(e.kind, e.amount_micro, e.note) for e in
                 db.session.scalars(db.select(LedgerEntry).order_by(LedgerEntry.id))]
        assert kinds == [("grant", 12_500_000, "hello"), ("adjustment", -2_250_000, None)]


def test_cli_codes_create(app, runner):
    result = run(runner, "codes", "create", "--amount", "5", "--count", "3",
                 "--expires-days", "7")
    assert result.exit_code == 0, result.output
    codes = result.output.split()
    assert len(codes) == 3
    with app.app_context():
        rows = db.session.scalars(db.select(RedemptionCode)).all()
        assert {r.code for r in rows} == set(codes)
        assert {r.amount_micro for r in rows} == {5 * MICRO}
        assert all(r.expires_at > utcnow() + timedelta(days=6) for r in rows)
    result = run(runner, "codes", "create", "--amount", "1.2345678", "--count", "1")
    assert result.exit_code != 0 and "at most 6 decimal places" in result.output
    result = run(runner, "codes", "create", "--amount", "1", "--count", "0")
    assert result.exit_code != 0 and "count" in result.output
    result = run(runner, "codes", "create", "--amount", "1", "--expires-days", "0")
    assert result.exit_code != 0


def test_cli_billing_check_and_sweep(app, runner):
    with app.app_context():
        uid = make_user("a@example.com", credits=3)
        make_user("b@example.com")
    result = run(runner, "billing", "check")
    assert (result.exit_code, result.output.strip()) == (0, "ledger OK: 2 users")
    with app.app_context():
        holds.reserve_credits(uid, None, "stuck", MICRO)
        lapse_lease("stuck", 10_000)
        db.session.execute(db.update(User).filter_by(id=uid).values(balance_micro=1))
        db.session.commit()
    result = run(runner, "billing", "check")
    assert result.exit_code == 1
    assert "user a@example.com: balance 0.000001 but the ledger sums to 3" in result.output
    with app.app_context():
        db.session.execute(db.update(User).filter_by(id=uid).values(balance_micro=3 * MICRO))
        db.session.commit()
    result = run(runner, "billing", "sweep", "--max-age", "20000")
    assert "settled 0 holds" in result.output
    result = run(runner, "billing", "sweep")
    assert result.exit_code == 0 and "settled 1 hold whose lease lapsed" in result.output
    assert run(runner, "billing", "check").exit_code == 0
    assert run(runner, "billing", "sweep", "--max-age", "-1").exit_code != 0
    with app.app_context():
        assert balances(uid) == (3 * MICRO, 0)
