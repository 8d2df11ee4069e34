"""Money through the live gateway (gunicorn + gevent) with the openai SDK, on SQLite and
PostgreSQL: exact charges, interrupted and failing streams, 50 concurrent requests, a worker
killed mid-request, and the legacy billing endpoints. Balances must match the ledger."""
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import requests

import billing
import holds
from extensions import db
from models import MICRO, Group, LedgerEntry, Reservation, User
from tests.support import wait_http


def client_for(gw, key):
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20)


def wallet(gw, email="member@example.com"):
    """(balance, reserved, sum of ledger, open reservations) of a user, from the database."""
    def read():
        user = db.session.scalar(db.select(User).filter_by(email=email))
        ledger = db.session.scalar(db.select(db.func.coalesce(
            db.func.sum(LedgerEntry.amount_micro), 0)).filter_by(user_id=user.id))
        held = db.session.scalar(db.select(db.func.count(Reservation.id))
                                 .filter_by(user_id=user.id))
        return user.balance_micro, user.reserved_micro, ledger, held
    return gw.run(read)


def settled(gw, count, email="member@example.com"):
    """Wait until `count` logs exist and no reservation is open; return the logs."""
    rows = gw.wait_logs(count, timeout=10)
    deadline = time.time() + 10
    while wallet(gw, email)[3] and time.time() < deadline:
        time.sleep(0.05)
    return rows


def assert_books_balance(gw):
    assert gw.run(billing.check_ledger) == []


def test_exact_charge_with_cached_tokens_per_request_and_multiplier(gateway):
    key = gateway.member(credits=10, price=False)
    gateway.price("gpt-4o-mini", input=2.5, output=10, cached_input=1.25, per_request=0.001)

    def vip():
        db.session.execute(db.update(Group).values(multiplier_ppm=1_500_000))
        db.session.commit()
    gateway.run(vip)
    completion = client_for(gateway, key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there friend"}],
        extra_body={"fake_cached": 4})
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (6, 9)
    # ((6-4)*2.5 + 4*1.25 + 9*10) credits/1M = 100 micro, + 1000 per request, x 1.5 = 1650
    [row] = settled(gateway, 1)
    assert row["cached_tokens"] == 4 and row["credits_micro"] == 1650
    assert wallet(gateway) == (10 * MICRO - 1650, 0, 10 * MICRO - 1650, 0)
    charge = gateway.scalar(db.select(LedgerEntry).filter_by(kind="charge"))
    assert (charge.amount_micro, charge.request_id) == (-1650, row["request_id"])
    assert_books_balance(gateway)


def test_stream_cut_by_the_client_bills_what_was_generated(gateway):
    key = gateway.member(credits=10, models="gpt-4o-mini=fault-long", price=False)
    gateway.price("gpt-4o-mini", input=1000, output=1000)
    stream = client_for(gateway, key).chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}])
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 4:
            break
    stream.close()
    [row] = settled(gateway, 1)
    assert row["http_status"] == 499 and 0 < row["completion_tokens"] < 40
    assert row["credits_micro"] > 0
    balance, reserved, ledger, held = wallet(gateway)
    assert (reserved, held) == (0, 0)
    assert balance == ledger == 10 * MICRO - row["credits_micro"]
    assert_books_balance(gateway)


def test_upstream_break_bills_what_was_delivered(gateway):
    key = gateway.member(credits=10, models="gpt-4o-mini=fault-break", price=False)
    gateway.price("gpt-4o-mini", input=1000, output=1000)
    response = requests.post(gateway.base_url + "/chat/completions", stream=True, timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    body = b"".join(response.iter_content(None))
    assert b"stream_interrupted" in body
    [row] = settled(gateway, 1)
    assert row["status"] == "Failed" and row["completion_tokens"] == 2
    assert row["credits_micro"] == billing.cost_micro(
        billing.Price("gpt-4o-mini", 1000 * MICRO, 1000 * MICRO, 1000 * MICRO, 0),
        row["prompt_tokens"], 2, 0, MICRO)
    balance, reserved, ledger, held = wallet(gateway)
    assert (reserved, held) == (0, 0) and balance == ledger == 10 * MICRO - row["credits_micro"]
    assert_books_balance(gateway)


def test_fifty_concurrent_requests_from_a_wallet_covering_ten(gateway):
    # Output only, 1 credit per token: max_tokens=9 holds 9 credits, the answer costs 9.
    key = gateway.member(credits=90, price=False)
    gateway.price("gpt-4o-mini", input=0, output=1_000_000)
    client = client_for(gateway, key)

    def one(_):
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=9,
                messages=[{"role": "user", "content": "hello there friend"}])
            return "ok"
        except openai.APIStatusError as err:
            return f"{err.status_code} {err.code}"

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(one, range(50)))
    assert outcomes.count("ok") == 10, outcomes
    assert outcomes.count("402 insufficient_credits") == 40
    settled(gateway, 50)
    assert wallet(gateway) == (0, 0, 0, 0)
    charges = gateway.scalar(db.select(db.func.count(LedgerEntry.id)).filter_by(kind="charge"))
    assert charges == 10
    assert_books_balance(gateway)


def test_legacy_billing_endpoints(gateway):
    key = gateway.member(credits=10)
    capped = gateway.key(name="capped", credit_limit_micro=3 * MICRO)
    client_for(gateway, key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there friend"}])
    [row] = settled(gateway, 1)
    charged = row["credits_micro"]  # 24 micro-credits at 1 and 2 credits per 1M tokens
    assert charged == 24
    headers = {"Authorization": f"Bearer {key}"}
    sub = requests.get(gateway.base_url + "/dashboard/billing/subscription", headers=headers,
                       timeout=10).json()
    assert sub["object"] == "billing_subscription" and sub["has_payment_method"] is True
    assert sub["hard_limit_usd"] == sub["soft_limit_usd"] == sub["system_hard_limit_usd"] == 10
    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    usage = requests.get(gateway.base_url + "/dashboard/billing/usage", headers=headers,
                         params={"start_date": today, "end_date": tomorrow}, timeout=10).json()
    assert usage == {"object": "list", "total_usage": 0.0024}  # hundredths of a credit
    sub = requests.get(gateway.base_url + "/dashboard/billing/subscription", timeout=10,
                       headers={"Authorization": f"Bearer {capped}"}).json()
    assert sub["hard_limit_usd"] == 3
    bad = requests.get(gateway.base_url + "/dashboard/billing/usage", headers=headers,
                       params={"start_date": "soon", "end_date": tomorrow}, timeout=10)
    assert bad.status_code == 400
    assert_books_balance(gateway)
