"""Console benchmark: the dashboard and logs pages over a million request logs.

Seeds (or reuses) a database per backend with `flask seed logs`, then times the pages
through the Flask test client, logged in as an admin and as a member:

    .venv/bin/python bench/bench_console.py                       # both backends, 1M rows
    .venv/bin/python bench/bench_console.py --backend sqlite --rows 100000 --reseed

SQLite lives in instance/bench-console.db; PostgreSQL in the database
tokenopen_bench_console on TOKENOPEN_BENCH_PG (default postgresql+psycopg://postgres@127.0.0.1:5432).
"""
import argparse
import os
import statistics
import sys
import time
from datetime import date, timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sqlalchemy import create_engine, func, select, text  # noqa: E402

PG_HOST = os.environ.get("TOKENOPEN_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
PG_DB = "tokenopen_bench_console"
ADMIN = "bench-admin@bench.local"
MEMBER = "user1@seed.tokenopen.local"


def database_url(backend):
    """The bench database of `backend`, created on PostgreSQL when missing."""
    if backend == "sqlite":
        os.makedirs(os.path.join(ROOT, "instance"), exist_ok=True)
        return "sqlite:///" + os.path.join(ROOT, "instance", "bench-console.db")
    engine = create_engine(f"{PG_HOST}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": PG_DB}):
            conn.execute(text(f'CREATE DATABASE "{PG_DB}"'))
    engine.dispose()
    return f"{PG_HOST}/{PG_DB}"


def prepare(app, rows, days, reseed):
    """Schema, an admin, and `rows` seeded logs (reused when already there)."""
    from bootstrap import create_user, ensure_default_group
    from extensions import db
    from models import RequestLog, User
    with app.app_context():
        if reseed:
            db.drop_all()
        db.create_all()
        for index in RequestLog.__table__.indexes:  # a reused database gets new indexes too
            index.create(db.engine, checkfirst=True)
        ensure_default_group()
        if not db.session.scalar(select(User).filter_by(email=ADMIN)):
            create_user(ADMIN, "bench-password", is_admin=True)
        db.session.commit()
        have = db.session.scalar(select(func.count(RequestLog.id)))
        admin_id = db.session.scalar(select(User.id).filter_by(email=ADMIN))
    if have >= rows:
        print(f"  reusing {have} log rows")
    else:
        began = time.monotonic()
        result = app.test_cli_runner().invoke(
            args=["seed", "logs", "--rows", str(rows - have), "--days", str(days),
                  "--random-seed", "5"])
        if result.exit_code:
            raise SystemExit(result.output + repr(result.exception))
        print(f"  seeded {rows - have} rows in {time.monotonic() - began:.1f}s")
    with app.app_context():
        if db.engine.dialect.name == "postgresql":
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE"))
        member_id = db.session.scalar(select(User.id).filter_by(email=MEMBER))
    return admin_id, member_id


def time_get(client, url, repeat):
    """(first, median) wall time in ms of GET `url`; fails loudly on a non-200."""
    timings = []
    for _ in range(repeat):
        began = time.perf_counter()
        response = client.get(url)
        response.get_data()  # a streamed body (the CSV) counts in full
        timings.append((time.perf_counter() - began) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"GET {url} -> {response.status_code}")
    return timings[0], statistics.median(timings), response


def logged_in(app, user_id):
    client = app.test_client()
    with client.session_transaction() as session:
        session["_user_id"] = str(user_id)
        session["_fresh"] = True
    return client


def bench(backend, rows, days, repeat, reseed):
    """Seed (or reuse) `backend`'s database and print the page timings."""
    from app import create_app
    from extensions import db
    print(f"== {backend}")
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url(backend), "SECRET_KEY": "bench",
                      "TESTING": True})
    admin_id, member_id = prepare(app, rows, days, reseed)
    results = []
    for who, user_id in (("admin", admin_id), ("member", member_id)):
        client = logged_in(app, user_id)
        _, _, first_page = time_get(client, "/logs", 1)
        cursor = first_page.get_data(as_text=True).split("before=")[1].split('"')[0]
        urls = ["/dashboard?days=30", "/dashboard?days=90",
                "/logs", "/logs?model=gpt-4o", "/logs?status=Timeout",
                f"/logs?before={cursor}", "/logs?model=no-such-model", "/logs?key=no-such-key",
                "/logs?to=" + (date.today() - timedelta(days=60)).isoformat(), "/"]
        if who == "admin":
            urls += [f"/logs?user={MEMBER}", "/logs?user=nobody@example.com"]
        if who == "member":
            urls.append("/logs.csv?from=" + (date.today() - timedelta(days=1)).isoformat())
        for url in urls:
            first, median, response = time_get(client, url, repeat)
            if url.startswith("/logs.csv"):
                url += f" ({response.get_data(as_text=True).count(chr(10)) - 1} rows)"
            results.append((who, url if "before=" not in url else "/logs (page 2, keyset)",
                            first, median))
    with app.app_context():
        db.engine.dispose()
    print(f"  {'as':7} {'page':48} {'first ms':>9} {'median ms':>10}")
    for who, url, first, median in results:
        print(f"  {who:7} {url:48} {first:9.1f} {median:10.1f}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reseed", action="store_true", help="drop and seed again")
    args = parser.parse_args()
    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    for backend in backends:
        bench(backend, args.rows, args.days, args.repeat, args.reseed)


if __name__ == "__main__":
    main()
