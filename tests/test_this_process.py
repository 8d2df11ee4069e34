"""this_process: the hot path asks for its pid without a system call, and a fork still counts."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import json, os
real_getpid, calls = os.getpid, []
def counting_getpid():
    calls.append(1)
    return real_getpid()
os.getpid = counting_getpid  # before anything binds it (prometheus_client's default argument)

from app import create_app
import cache, metrics, writer
from extensions import db
app = create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://", "SECRET_KEY": "x",
                  "REDIS_URL": None, "TESTING": True})
numbers = cache.TTLCache(depends_on=())

def one_request(ctx):
    metrics.request_started()
    metrics.REQUESTS.labels(model="m", status="200").inc()
    metrics.DURATION.observe(0.01)
    metrics.IN_FLIGHT.dec()
    numbers.get("k", lambda: 1)
    writer.writer_for(db.engine)

with app.app_context() as ctx:
    one_request(ctx)  # first use: files, listener, writer
    before = len(calls)
    for _ in range(100):
        one_request(ctx)
    steady = len(calls) - before

    # A fork is still seen: the child writes its own metrics file and has its own writer.
    parent_writer = writer.writer_for(db.engine)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        metrics.REQUESTS.labels(model="m", status="200").inc()
        mine = writer.writer_for(db.engine)
        os.write(write, json.dumps({"pid": real_getpid(), "own_writer": mine is not parent_writer,
                                    "writer_pid": mine.pid}).encode())
        os._exit(0)
    os.waitpid(child, 0)
    forked = json.loads(os.read(read, 4096))
files = sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
print(json.dumps({"steady_getpid_calls": steady, "forked": forked, "files": files,
                  "parent": real_getpid()}))
"""


def test_the_hot_path_reads_its_pid_once_and_a_fork_still_counts(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    env.pop("TOKENOPEN_REDIS_URL", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # 100 requests' worth of metric updates, cache gets and writer lookups: no getpid at all.
    assert figures["steady_getpid_calls"] == 0
    child = figures["forked"]["pid"]
    assert figures["forked"]["own_writer"] and figures["forked"]["writer_pid"] == child
    assert f"counter_{child}.db" in figures["files"]
    assert f"counter_{figures['parent']}.db" in figures["files"]
