"""Several nodes: two gunicorn masters (2 gevent workers each) on one PostgreSQL and one Redis.

The exact-limit parts use the shared services (a database and a Redis db number of
their own). The outage parts stop and start a Redis and a PostgreSQL of the test's own
(a second redis-server on a free port, a throwaway initdb cluster), never the shared ones.
"""
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
import redis
import requests

from tests.support import (PYTHON, ROOT, LiveGateway, drop_postgres_database, free_port,
                           postgres_database_url, wait_http)

REDIS_URL = "redis://127.0.0.1:6379/13"
CHAT = "/chat/completions"


def _post(gw, key, timeout=20, **body):
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", [{"role": "user", "content": "hello there friend"}])
    # A fresh connection per request, so requests land on both workers of a node.
    return requests.post(gw.base_url + CHAT, json=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {key}", "Connection": "close"})


def _all_at_once(calls):
    """Run the calls in threads together; their responses' status codes."""
    results = [None] * len(calls)

    def run(i):
        try:
            response = calls[i]()
            response.content  # read streams to the end
            results[i] = response.status_code
        except requests.RequestException as err:
            results[i] = repr(err)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _start_together(gateways, timeout=150):
    """Migrate once, then start every master at once (on a busy 2-core machine a gunicorn
    master can take well over 30 s to answer, so the wait is longer than LiveGateway's)."""
    subprocess.run([PYTHON, "-m", "flask", "--app", "app", "init-db"], cwd=ROOT,
                   env=gateways[0].env, check=True, capture_output=True)
    for gw in gateways:
        gw.log = open(os.path.join(gw.workdir, "gunicorn.log"), "w")
        gw.proc = subprocess.Popen([PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                   cwd=ROOT, env=gw.env, stdout=gw.log,
                                   stderr=subprocess.STDOUT)
    for gw in gateways:
        wait_http(gw.url + "/healthz", timeout=timeout, proc=gw.proc)


def _group(gw, name, **limits):
    from extensions import db
    from models import Group

    def make():
        db.session.add(Group(name=name, models="*", **limits))
        db.session.commit()
    gw.run(make)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, fake_upstream, request):
    """Two masters on the shared PostgreSQL (own database) and Redis (own db number)."""
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    name = f"tokenopen_multinode_{worker}_{os.getpid()}"
    url = postgres_database_url(name)
    redis.Redis.from_url(REDIS_URL).flushdb()
    # Caches kept a minute: what the nodes see of a change comes through Redis pub/sub.
    env = {"TOKENOPEN_REDIS_URL": REDIS_URL, "WEB_CONCURRENCY": "2",
           "TOKENOPEN_UPSTREAM_TIMEOUT": "5", "TOKENOPEN_CACHE_TTL": "60"}
    pair = []
    for n in range(2):
        path = tmp_path_factory.mktemp(f"node{n}")
        pair.append(LiveGateway(url, str(path), fake_upstream,
                                extra_env={**env, "PROMETHEUS_MULTIPROC_DIR": str(path / "metrics")}))
    _start_together(pair)
    yield pair
    for gw in pair:
        gw.stop()
    drop_postgres_database(name)
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture
def pair(nodes):
    nodes[0].reset()
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    # reset() deletes rows behind the ORM's back: tell every worker of both nodes.
    conn.publish("tokenopen:cache", "0:ApiKey,User,Group,Channel,ChannelModel,ModelPrice,Setting")
    nodes[0].app.config["REDIS_URL"] = REDIS_URL  # this process's commits are announced too
    return nodes


def test_a_change_reaches_every_worker_of_every_node_at_once(pair):
    # finding 7: changes reached other workers only when their cache expired
    from extensions import db
    from models import ApiKey
    a, b = pair
    key = a.member(credits=100)
    for _ in range(4):  # cached by every worker that served one
        assert _post(a, key, max_tokens=5).status_code == 200
        assert _post(b, key, max_tokens=5).status_code == 200

    def disable():
        row = db.session.scalar(db.select(ApiKey))
        row.disabled = True
        db.session.commit()
    a.run(disable)
    time.sleep(0.5)  # well under the 60 s the caches would otherwise keep the key
    codes = [_post(gw, key, max_tokens=5).status_code for gw in (a, b) * 4]
    assert codes == [401] * 8, codes


def test_rpm_is_exact_across_two_nodes(pair):
    a, b = pair
    _group(a, "ten", rpm=10)
    key = a.member(credits=100)
    a.run(_move_member_to, "member@example.com", "ten")
    codes = _all_at_once([lambda gw=(a if i % 2 else b): _post(gw, key, max_tokens=5)
                          for i in range(30)])
    assert codes.count(200) == 10 and codes.count(429) == 20, codes


def test_tpm_admits_exactly_what_fits_across_two_nodes(pair):
    # finding 3: --tpm 100 and 20 concurrent streams of max_tokens 10 used to admit all 20
    from blueprints.api.tokens import admit_prompt_tokens
    a, b = pair
    key = a.member(credits=100, tpm=100)
    per_request = admit_prompt_tokens(
        {"messages": [{"role": "user", "content": "hello there friend"}]}) + 10
    codes = _all_at_once([lambda gw=(a if i % 2 else b): _post(gw, key, max_tokens=10, stream=True)
                          for i in range(20)])
    admitted = codes.count(200)
    # at least what fits up front; a few more only as finished ones free what they did not use
    assert 100 // per_request <= admitted < 20 and codes.count(429) == 20 - admitted, codes
    rows = a.wait_logs(20)
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert 0 < used <= 100, used  # never past the minute's limit (it was 3.6x before)


def test_concurrency_is_exact_across_two_nodes(pair):
    # finding 4: 200 concurrent streams from one key were all admitted
    a, b = pair
    key = a.member(credits=100, models="gpt-4o-mini=fault-slow", price=False, concurrency=3)
    a.price("gpt-4o-mini")
    codes = _all_at_once([lambda gw=(a if i % 2 else b): _post(gw, key, stream=True, max_tokens=20)
                          for i in range(12)])
    assert codes.count(200) == 3 and codes.count(429) == 9, codes
    deadline = time.time() + 5  # every slot is given back when its stream ends
    while redis.Redis.from_url(REDIS_URL).keys("tokenopen:rl:key:*:conc"):
        assert time.time() < deadline
        time.sleep(0.1)
    assert _post(b, key, max_tokens=5).status_code == 200


def test_cool_down_is_shared_by_both_nodes(pair):
    # finding 6: "3 failures in a row" must mean that across workers and nodes
    a, b = pair
    a.user("member@example.com", credits=100)
    a.channel("broken", models="gpt-4o-mini=fault-500", priority=10)
    a.channel("good", models="gpt-4o-mini", priority=1)
    a.price("gpt-4o-mini")
    key = a.key()
    for i in range(8):  # every request succeeds, through "good" once "broken" has failed
        assert _post(a if i % 2 else b, key, max_tokens=5).status_code == 200
    tried_broken = [e for e in a.upstream.events() if e["type"] == "request"
                    and e["body"].get("model") == "fault-500"]
    assert len(tried_broken) == 3  # then the channel cooled down for every worker of both
    metrics = requests.get(b.url + "/metrics", timeout=5).text
    assert 'tokenopen_channel_up{channel="broken"} 0.0' in metrics


def test_metrics_add_up_every_worker_of_a_node(pair):
    a, b = pair
    key = a.member(credits=100)
    before = _requests_total(a)
    codes = _all_at_once([lambda: _post(a, key, max_tokens=5, stream=True) for _ in range(12)])
    assert codes == [200] * 12
    deadline = time.time() + 5
    while _requests_total(a) - before < 12:
        assert time.time() < deadline
        time.sleep(0.1)
    assert _requests_total(a) - before == 12
    # both workers served some of them: each writes its own counter file in the master's dir
    served_by = glob.glob(os.path.join(a.env["PROMETHEUS_MULTIPROC_DIR"], "counter_*.db"))
    assert len(served_by) == 2, served_by


def _requests_total(gw):
    text = requests.get(gw.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tokenopen_requests_total{"))


def _move_member_to(email, group_name):
    from extensions import db
    from models import Group, User
    user = db.session.scalar(db.select(User).filter_by(email=email))
    user.group_id = db.session.scalar(db.select(Group.id).filter_by(name=group_name))
    db.session.commit()


# --- outages, on services of the test's own ---------------------------------------------------

class OwnRedis:
    """A redis-server of this test's own on a free port (no persistence)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class OwnPostgres:
    """A throwaway PostgreSQL cluster from initdb, run as the postgres user on a free port."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.fail("initdb not found under /usr/lib/postgresql/*/bin")
        self.bin = os.path.dirname(found[-1])
        self.dir = tempfile.mkdtemp(prefix="tokenopen-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        os.chmod(self.dir, 0o777)
        self._as_postgres([os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres",
                           "--auth=trust", "-E", "UTF8"])

    def _as_postgres(self, argv):
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def start(self):
        self._as_postgres([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-w", "-l",
                           os.path.join(self.dir, "log"), "-o",
                           f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                           " -c fsync=off", "start"])

    def stop(self):
        self._as_postgres([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate",
                           "-w", "stop"])

    def remove(self):
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def own_services(tmp_path_factory, fake_upstream):
    """One master (2 workers) on a Redis and a PostgreSQL that this test may stop."""
    own_redis, own_pg = OwnRedis(), OwnPostgres()
    own_redis.start()
    own_pg.start()
    path = tmp_path_factory.mktemp("outage")
    gw = LiveGateway(own_pg.url, str(path), fake_upstream,
                     extra_env={"TOKENOPEN_REDIS_URL": own_redis.url, "WEB_CONCURRENCY": "2"})
    _start_together([gw])
    yield gw, own_redis, own_pg
    gw.stop()
    own_redis.stop()
    own_pg.remove()


def test_redis_outage_serves_throughout_and_limits_come_back(own_services):
    # finding 1: Redis down -> every rate-limited request failed with 500
    gw, own_redis, _ = own_services
    gw.reset()
    _group(gw, "five", rpm=5)
    key = gw.member(credits=100)
    gw.run(_move_member_to, "member@example.com", "five")
    own_redis.stop()
    codes = [_post(gw, key, max_tokens=5).status_code for _ in range(8)]
    assert codes == [200] * 8  # limits fail open: 8 > 5 all served
    health = requests.get(gw.url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert "REDIS UNREACHABLE" in gw.gunicorn_log()
    own_redis.start()  # back, empty, on the same port: no restart of the gateway
    deadline = time.time() + 10
    while requests.get(gw.url + "/healthz", timeout=5).json()["status"] != "ok":
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.2)  # let every worker's one-second skip run out
    codes = [_post(gw, key, max_tokens=5).status_code for _ in range(7)]
    assert codes.count(200) == 5 and codes.count(429) == 2, codes


def test_database_outage_answers_503_then_recovers(own_services):
    # finding 2: database down -> 500 internal_error typed upstream_error
    gw, _, own_pg = own_services
    gw.reset()
    key = gw.member(credits=100)
    assert _post(gw, key, max_tokens=5).status_code == 200
    own_pg.stop()
    try:
        response = _post(gw, key, max_tokens=5)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "api_error"
        assert response.json()["error"]["code"] == "service_unavailable"
        anthropic = requests.post(gw.base_url + "/messages", headers={"x-api-key": key},
                                  json={"model": "gpt-4o-mini", "max_tokens": 5,
                                        "messages": [{"role": "user", "content": "hi"}]},
                                  timeout=20)
        assert anthropic.status_code == 503 and anthropic.json()["error"]["type"] == "api_error"
        assert requests.get(gw.url + "/healthz", timeout=10).status_code == 503
    finally:
        own_pg.start()
    deadline = time.time() + 15
    while _post(gw, key, max_tokens=5).status_code != 200:
        assert time.time() < deadline
        time.sleep(0.3)
    assert requests.get(gw.url + "/healthz", timeout=5).status_code == 200
