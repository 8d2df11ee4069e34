"""Rate limits on Redis: exact across several gunicorn workers (TOKENOPEN_REDIS_URL set)."""
import openai
import pytest
import redis

from tests.support import LiveGateway

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="module")
def redis_gateway(tmp_path_factory, fake_upstream):
    """Two gevent workers sharing their limit counters through Redis."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    path = tmp_path_factory.mktemp("gw-redis")
    gw = LiveGateway(f"sqlite:///{path}/gw.db", str(path), fake_upstream,
                     extra_env={"TOKENOPEN_REDIS_URL": REDIS_URL, "WEB_CONCURRENCY": "2"})
    gw.start()
    yield gw
    gw.stop()
    redis.Redis.from_url(REDIS_URL).flushdb()


def test_group_rpm_is_exact_across_workers(redis_gateway):
    from extensions import db
    from models import Group
    gw = redis_gateway
    gw.reset()

    def make_group():
        db.session.add(Group(name="five", models="*", rpm=5))
        db.session.commit()
    gw.run(make_group)
    gw.user("redis@example.com", credits=10, group="five")
    gw.channel()
    gw.price("gpt-4o-mini")
    key = gw.key("redis@example.com")
    outcomes = []
    for _ in range(9):
        # A fresh client each time, so requests land on both workers.
        client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20)
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            outcomes.append(200)
        except openai.RateLimitError:
            outcomes.append(429)
    assert outcomes.count(200) == 5 and outcomes.count(429) == 4
    counters = redis.Redis.from_url(REDIS_URL).keys("tokenopen:rl:user:*:win")
    assert counters, "the counters live in Redis, shared by both workers"
