"""rate_limits, cache, routing's shared failure counts, retention, metrics access, 503s.

Unit tests of the limiter run the same cases on both backends: in memory and on the
shared Redis (a db number of its own). The issue-11 finding each test covers is named.
"""
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import redis
from flask import Flask

import rate_limits
from rate_limits import ConcurrencyLimited, Party, RateLimited
from tests.support import ROOT, longest_stall

# A Redis database per pytest-xdist worker: a flush by one worker must not wipe another's slots.
REDIS_URL = "redis://127.0.0.1:6379/" + str(
    12 - int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 8)
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture(params=["memory", "redis"])
def limiter_app(request):
    """An app context whose REDIS_URL picks the limiter's backend."""
    app = Flask("t")
    app.config.update(REDIS_URL=REDIS_URL if request.param == "redis" else None,
                      LIMIT_LEASE_SECONDS=30, CACHE_TTL=2)
    if request.param == "redis":
        redis.Redis.from_url(REDIS_URL).flushdb()
    rate_limits.reset_memory()
    with app.app_context():
        yield app
    if request.param == "redis":
        redis.Redis.from_url(REDIS_URL).flushdb()


def test_rpm_is_exact_and_a_refusal_counts_nothing(limiter_app):
    # finding 5: the key's limit is checked before the user's, and a refused request
    # spends neither allowance
    key = Party("key", 1, rpm=2, who="this key")
    user = Party("user", 1, rpm=3, who="your group")
    for _ in range(2):
        rate_limits.admit("r", (key, user))
    with pytest.raises(RateLimited) as refused:
        rate_limits.admit("r", (key, user))
    assert refused.value.code == "rate_limit_exceeded" and refused.value.retry_after >= 1
    assert "this key" in refused.value.message
    # the user's third request is still there for another key of the same user
    other_key = Party("key", 2, rpm=10)
    admission = rate_limits.admit("r", (other_key, user))
    assert rate_limits.headers(admission)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited, match="your group"):
        rate_limits.admit("r", (other_key, user))


def test_tpm_admits_by_reservation_and_corrects_to_actual(limiter_app):
    # finding 3: TPM counted only when requests finished let 20 concurrent streams in
    user = Party("user", 7, tpm=100)
    admitted = []
    for n in range(20):  # 20 requests in flight, each may use up to 18 tokens
        try:
            admitted.append(rate_limits.admit(f"r{n}", (user,), tokens=18))
        except RateLimited:
            pass
    assert len(admitted) == 5  # 5 x 18 = 90 <= 100 < 6 x 18
    for admission in admitted:
        rate_limits.release(admission, actual_tokens=10)  # 5 x 10 = 50 really used
    more = rate_limits.admit("r-more", (user,), tokens=18)  # 50 + 18 fits again
    assert rate_limits.headers(more)["x-ratelimit-remaining-tokens"] == str(100 - 68)
    with pytest.raises(RateLimited, match="lower max_tokens"):
        rate_limits.admit("r-huge", (user,), tokens=101)


def test_concurrency_slots_come_back_on_release_and_when_the_lease_lapses(limiter_app):
    # finding 4: no concurrency limit
    key = Party("key", 3, concurrency=2)
    first = rate_limits.admit("a", (key,))
    rate_limits.admit("b", (key,))
    with pytest.raises(ConcurrencyLimited) as refused:
        rate_limits.admit("c", (key,))
    assert refused.value.code == "concurrency_limit_exceeded"
    rate_limits.release(first)
    rate_limits.release(first)  # twice is harmless
    rate_limits.admit("c", (key,))
    # a dead worker never releases: its slots come back when the lease lapses
    limiter_app.config["LIMIT_LEASE_SECONDS"] = 1
    other = Party("key", 4, concurrency=1)
    held = rate_limits.admit("d", (other,))
    with pytest.raises(ConcurrencyLimited):
        rate_limits.admit("e", (other,))
    time.sleep(0.6)
    rate_limits.renew(held, force=True)  # a live request keeps its slot
    time.sleep(0.6)
    with pytest.raises(ConcurrencyLimited):
        rate_limits.admit("e", (other,))
    time.sleep(1.2)
    rate_limits.admit("e", (other,))


def test_headers_report_the_limit_with_the_fewest_remaining(limiter_app):
    key = Party("key", 5, rpm=100, tpm=1000)
    user = Party("user", 5, rpm=4, tpm=5000)
    admission = rate_limits.admit("r", (key, user), tokens=10)
    headers = rate_limits.headers(admission)
    assert headers["x-ratelimit-limit-requests"] == "4"
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "990"
    # the minute starts with the party's first request, not at a clock minute
    assert headers["x-ratelimit-reset-requests"] in ("59s", "60s")
    assert rate_limits.headers(rate_limits.admit("r", (Party("key", 6),))) == {}


def test_redis_unreachable_fails_open_quickly_and_logs(caplog):
    # finding 1: Redis down made every rate-limited request a 500
    import redis_store
    app = Flask("t")
    app.config.update(REDIS_URL=DEAD_REDIS_URL, LIMIT_LEASE_SECONDS=30)
    redis_store._state.update(skip_until=0.0, logged_at=0.0, down_since=None)
    with app.app_context():
        started = time.monotonic()
        for n in range(50):
            admission = rate_limits.admit(f"r{n}", (Party("key", 1, rpm=1, concurrency=1),))
            rate_limits.release(admission, 5)
        assert time.monotonic() - started < 2
        assert redis_store.health() == "degraded"
    assert sum("REDIS UNREACHABLE" in r.getMessage() for r in caplog.records) == 1
    redis_store._state.update(skip_until=0.0, logged_at=0.0, down_since=None)


# --- caches (finding 7) ----------------------------------------------------------------------

def test_cache_is_cleared_after_commit_not_at_flush(app):
    from cache import TTLCache
    from extensions import db
    from models import Setting
    app.config["CACHE_TTL"] = 60
    cache = TTLCache(depends_on=(Setting,))
    with app.app_context():
        Setting.put("x", "old")
        db.session.commit()
        load = lambda: Setting.get("x")  # noqa: E731
        assert cache.get("x", load) == "old"
        Setting.put("x", "new")
        db.session.flush()
        # between flush and commit a lookup (another greenlet's, in real life) re-caches
        assert cache.get("x", lambda: "old") == "old"
        db.session.commit()
        assert cache.get("x", load) == "new"


def test_not_found_is_cached_briefly_and_apart_from_real_entries(app):
    from cache import MAX_MISSES, TTLCache
    app.config["CACHE_TTL"] = 60
    cache = TTLCache(maxsize=10)
    calls = []
    with app.app_context():
        assert cache.get("real", lambda: calls.append("real") or "value") == "value"
        for n in range(MAX_MISSES * 2):  # a key-guessing flood
            assert cache.get(f"guess{n}", lambda: None) is None
        assert cache.get("real", lambda: calls.append("again") or "value") == "value"
        assert calls == ["real"]  # the real entry survived the flood
        cache.get("late", lambda: None)
        time.sleep(1.1)  # a key created a moment after a miss is found within a second
        assert cache.get("late", lambda: "now exists") == "now exists"


def test_a_load_racing_a_clear_is_not_stored(app):
    from cache import TTLCache
    app.config["CACHE_TTL"] = 60
    cache = TTLCache()
    with app.app_context():
        def load():
            cache.clear()  # a commit elsewhere lands while this load reads the old row
            return "old"
        assert cache.get("k", load) == "old"
        assert cache.get("k", lambda: "new") == "new"


def test_a_value_in_use_is_reloaded_ahead_once_no_request_waits():
    """In a gevent worker: past REFRESH_AT of its life a value is still served at once and
    reloaded in another greenlet, not while a request waits for its answer; one found past
    its TTL is loaded in place."""
    code = """
from gevent import monkey; monkey.patch_all()
import gevent
from flask import Flask
from cache import REFRESH_AT, TTLCache, answering
app = Flask("t")
app.config["CACHE_TTL"] = 0.4
cache, loads = TTLCache(), []
def load(value):
    return lambda: loads.append((value, gevent.getcurrent())) or value
with app.app_context():
    me = gevent.getcurrent()
    assert cache.get("k", load("v1")) == "v1" and loads == [("v1", me)]
    gevent.sleep(0.4 * REFRESH_AT + 0.02)  # due, not expired
    with answering():
        assert cache.get("k", load("v2")) == "v1"  # at once
        gevent.sleep(0.03)
        assert len(loads) == 1  # no reload while a request waits for its answer
    gevent.sleep(0.03)
    assert len(loads) == 2 and loads[1][0] == "v2" and loads[1][1] is not me
    assert cache.get("k", load("v3")) == "v2" and len(loads) == 2
    gevent.sleep(0.45)  # unused past its TTL
    assert cache.get("k", load("v4")) == "v4" and loads[-1] == ("v4", me)
    gevent.sleep(0.4 * REFRESH_AT + 0.02)
    assert cache.get("k", load(None)) == "v4"  # the row is gone: the reload finds nothing
    gevent.sleep(0.03)
    assert cache.get("k", load("v5")) is None and loads[-1][0] is None  # not served again
    def down():
        raise OSError("could not connect to server at 10.1.2.3")
    cache.get("gone", lambda: "x")
    gevent.sleep(0.4 * REFRESH_AT + 0.02)
    import logging, io
    caught = io.StringIO()
    app.logger.addHandler(logging.StreamHandler(caught))
    assert cache.get("gone", down) == "x"  # the database is down: still served in its TTL
    gevent.sleep(0.03)
    assert "ahead failed (OSError)" in caught.getvalue() and "10.1.2.3" not in caught.getvalue()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# --- cool-down shared (finding 6) -------------------------------------------------------------

def test_failures_in_a_row_are_shared_through_redis(app):
    from blueprints.api import routing
    redis.Redis.from_url(REDIS_URL).flushdb()
    app.config["REDIS_URL"] = REDIS_URL
    with app.app_context():
        assert routing.failures_in_a_row(99, add=True) == 1
        routing._local_failures.clear()  # what another worker sees is Redis, not this process
        assert routing.failures_in_a_row(99, add=True) == 2
        assert routing.failures_in_a_row(99, reset=True) == 1  # a success anywhere resets it
        assert routing.failures_in_a_row(99, add=True) == 1
    redis.Redis.from_url(REDIS_URL).flushdb()


# --- retention, metrics access, database down --------------------------------------------------

def test_logs_prune_keeps_the_daily_rollups(app, runner, factory):
    from extensions import db
    from models import RequestLog, UsageDaily, utcnow
    from tests.support import insert_logs
    user_id = factory.user("old@example.com")
    with app.app_context():
        insert_logs([{"user_id": user_id, "created_at": utcnow() - timedelta(days=40)},
                     {"user_id": user_id, "created_at": utcnow() - timedelta(days=1)}])
        rollups = db.session.scalar(db.select(db.func.sum(UsageDaily.requests)))
    result = runner.invoke(args=["logs", "prune", "--older-than-days", "30"])
    assert result.exit_code == 0 and "pruned 1 " in result.output
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(RequestLog.id))) == 1
        assert db.session.scalar(db.select(db.func.sum(UsageDaily.requests))) == rollups == 2


def test_retention_setting_prunes_from_the_background_loop(app, factory):
    from extensions import db
    from models import RequestLog, utcnow
    from retention import prune_once
    from tests.support import insert_logs
    user_id = factory.user("old@example.com")
    with app.app_context():
        insert_logs([{"user_id": user_id, "created_at": utcnow() - timedelta(days=10)}])
    assert prune_once(app) == 0  # default 0 = keep
    app.config["LOG_RETENTION_DAYS"] = 7
    assert prune_once(app) == 1
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(RequestLog.id))) == 0


def test_the_background_loop_prunes_in_small_batches_with_rests(app, factory, monkeypatch):
    import retention
    from models import utcnow
    from tests.support import insert_logs
    user_id = factory.user("old@example.com")
    with app.app_context():
        insert_logs([{"user_id": user_id, "created_at": utcnow() - timedelta(days=10)}] * 5)
    app.config["LOG_RETENTION_DAYS"] = 7
    monkeypatch.setattr(retention, "BATCH", 2)
    rests = []
    monkeypatch.setattr(retention.time, "sleep", rests.append)
    assert retention.prune_once(app) == 5
    assert rests == [retention.PAUSE_SECONDS] * 2  # after each full batch, not after the last


def test_a_gevent_worker_keeps_serving_while_it_prunes_a_backlog(tmp_path):
    """40,000 old rows pruned by the background loop of a gevent worker: its other greenlets
    wait ~a batch at most (~12 ms here; one 5,000-row batch after another held them ~280 ms,
    the whole prune)."""
    pruned, stall = longest_stall(f"""
        from datetime import timedelta
        from app import create_app
        from extensions import db
        from models import RequestLog, utcnow
        import retention
        retention.PAUSE_SECONDS = 0.01  # the rests' length is not the point, but that they are
        app = create_app({{"SQLALCHEMY_DATABASE_URI": "sqlite:///{tmp_path}/db.sqlite",
                          "TESTING": True, "SECRET_KEY": "test", "LOG_RETENTION_DAYS": 7}})
        with app.app_context():
            db.create_all()
            assert retention.prune_once(app) == 0  # warm: the statement compiled
            old = utcnow() - timedelta(days=10)
            db.session.execute(db.insert(RequestLog), [dict(
                request_id=f"old-{{i}}", endpoint="chat", status="Success", http_status=200,
                model="m", key_name="k", created_at=old) for i in range(40_000)])
            db.session.commit()
        """, "retention.prune_once(app)")
    assert pruned == 40_000
    assert stall < 0.05, f"the worker's greenlets were held up {stall * 1000:.0f} ms"


def test_metrics_access_rules():
    # finding 9: no metrics endpoint
    from metrics import may_scrape
    assert may_scrape("127.0.0.1", None, None, None) == (True, None)
    assert may_scrape("::1", None, None, None) == (True, None)
    assert may_scrape("127.0.0.1", "203.0.113.9", None, None) == (False, 404)  # via a proxy
    assert may_scrape("10.0.0.5", None, None, None) == (False, 404)
    assert may_scrape("10.0.0.5", None, "Bearer nope", "s3cret") == (False, 401)
    assert may_scrape("10.0.0.5", None, "Bearer s3cret", "s3cret")[0] is True


def test_metrics_endpoint_counts_requests(live):
    import requests
    key = live.member()
    requests.post(live.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                  json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                  timeout=10).raise_for_status()
    text = requests.get(live.url + "/metrics", timeout=5).text
    assert 'tokenopen_requests_total{model="gpt-4o-mini",status="200"}' in text
    assert 'tokenopen_channel_up{channel="fake"} 1.0' in text
    assert "tokenopen_ttft_seconds_bucket" in text
    assert requests.get(live.url + "/metrics", headers={"X-Forwarded-For": "1.2.3.4"},
                        timeout=5).status_code == 404


def test_database_unreachable_is_503_service_unavailable(tmp_path):
    # finding 2: database down answered 500 internal_error typed upstream_error
    from app import create_app
    app = create_app({"SQLALCHEMY_DATABASE_URI":
                      "postgresql+psycopg://postgres@127.0.0.1:1/nothing", "SECRET_KEY": "t",
                      "TESTING": False, "CACHE_TTL": 0})
    client = app.test_client()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    answer = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-x"})
    assert answer.status_code == 503
    assert answer.json["error"]["type"] == "api_error"
    assert answer.json["error"]["code"] == "service_unavailable"
    assert "database" in answer.json["error"]["message"]
    answer = client.post("/v1/messages", json=body, headers={"x-api-key": "sk-x"})
    assert answer.status_code == 503 and answer.json["type"] == "error"
    assert answer.json["error"]["type"] == "api_error"
    page = client.get("/login")
    assert page.status_code == 503 and b"cannot reach its database" in page.data
    assert client.get("/healthz").status_code == 503


# --- live: count_tokens limited, headers, 499 (findings 5 and 8) ------------------------------

def test_count_tokens_is_rate_limited_free_and_not_logged(live):
    import requests
    key = live.member(rpm=2)
    url = live.base_url + "/messages/count_tokens"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    answers = [requests.post(url, json=body, headers={"x-api-key": key}, timeout=10)
               for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert answers[2].json()["error"]["type"] == "rate_limit_error"
    assert int(answers[2].headers["Retry-After"]) >= 1
    assert live.logs() == []


def test_concurrency_limit_answers_429_concurrency_limit_exceeded(live):
    import requests
    key = live.member(models="gpt-4o-mini=fault-slow", price=False, concurrency=1)
    live.price("gpt-4o-mini")
    url = live.base_url + "/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "stream": True, "max_tokens": 10}
    with requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, stream=True,
                       timeout=20) as first:
        assert first.status_code == 200
        second = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"},
                               timeout=20)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert second.json()["error"]["type"] == "rate_limit_error"
        assert second.headers["Retry-After"] == "1"
        first.content
    third = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=20)
    assert third.status_code == 200  # the slot came back when the stream ended


def test_client_gone_before_the_first_byte_is_logged_499(live):
    import json
    import socket
    from extensions import db
    from models import Reservation
    key = live.member(models="gpt-4o-mini=fault-timeout", price=False)
    live.price("gpt-4o-mini")
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.5)
    sock.close()  # gives up long before the upstream (10 s) or the gateway's timeout (2 s)
    [row] = live.wait_logs(1, timeout=5)
    assert row["http_status"] == 499 and row["status"] == "Failed"
    assert row["latency_ms"] < 1500  # noticed while waiting, not after the 2 s timeout
    assert live.scalar(db.select(db.func.count(Reservation.id))) == 0  # the hold went back


def test_a_change_made_elsewhere_reaches_a_served_worker_within_the_ttl(tmp_path, fake_upstream):
    """A served worker with a 1 s cache TTL, no Redis: its values in use are reloaded ahead
    between requests, and a key disabled by another process (the admin CLI, say) is refused
    within the TTL all the same."""
    import requests
    from tests.support import LiveGateway
    gw = LiveGateway(f"sqlite:///{tmp_path}/gw.db", str(tmp_path), fake_upstream,
                     extra_env={"TOKENOPEN_CACHE_TTL": "1"})
    gw.start()
    try:
        gw.reset()
        key = gw.member("ttl@example.com")
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

        def call():
            return requests.post(gw.base_url + "/chat/completions", json=body, timeout=10,
                                 headers={"Authorization": f"Bearer {key}"}).status_code
        deadline = time.monotonic() + 2.5  # past two TTLs in use: reloads ahead happened
        while time.monotonic() < deadline:
            assert call() == 200
            time.sleep(0.1)

        def disable():
            from extensions import db
            from models import ApiKey
            db.session.execute(db.update(ApiKey).values(disabled=True))
            db.session.commit()
        gw.run(disable)
        changed = time.monotonic()
        while call() == 200:
            assert time.monotonic() - changed < 1.5, "a disabled key still served past its TTL"
            time.sleep(0.05)
        assert call() == 401
    finally:
        gw.stop()


def test_a_success_resets_the_shared_count_only_when_a_failure_is_on_record(app, monkeypatch):
    """With Redis the reset is a round trip on every answer: a channel whose row shows no
    failure (and that this worker did not see fail) skips it."""
    import redis_store
    from blueprints.api import routing
    from blueprints.api.providers.base import Target
    redis.Redis.from_url(REDIS_URL).flushdb()
    app.config["REDIS_URL"] = REDIS_URL
    calls = []
    run = redis_store.run
    monkeypatch.setattr(redis_store, "run", lambda command, url=None: (
        calls.append(command), run(command, url))[1])
    target = Target(channel_id=99, channel_name="c", type="openai", base_url="http://up",
                    api_key="k", upstream_model="m")
    clean, on_record = (routing.Route(target, 0, 1, None, fail_count=n) for n in (0, 2))
    with app.app_context():
        routing.note_success(clean)
        assert calls == []  # nothing on record: no round trip
        assert routing.failures_in_a_row(99, add=True) == 1  # another worker's failure...
        routing._local_failures.clear()
        routing.note_success(on_record)  # ...on record in the row this worker loaded
        assert routing.failures_in_a_row(99, add=True) == 1  # reset, then one more
        routing.note_failure(target, "boom")  # this worker's own (its row: no channel 99)
        calls.clear()
        routing.note_success(clean)
        assert calls  # the reset (and the row's invalidation, published)
        assert routing.failures_in_a_row(99, add=True) == 1
    redis.Redis.from_url(REDIS_URL).flushdb()
