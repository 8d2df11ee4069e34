"""seed logs: synthetic request logs (and their daily rollup) for demos and benchmarks."""
import random
import time
import uuid
from datetime import timedelta

import click
from sqlalchemy import String, case, cast, delete, func, insert, literal, select

from bootstrap import create_user
from extensions import db
from models import ApiKey, RequestLog, UsageDaily, User, utcnow

SEED_DOMAIN = "seed.tokenopen.local"
SEED_MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku", "claude-sonnet-4",
               "gemini-2.0-flash", "deepseek-chat")
SEED_CHANNELS = ("openai-main", "openai-backup", "anthropic", "gemini", "deepseek")
KEY_NAMES = ("laptop", "ci", "chatbot")
ENDPOINTS = ("/v1/chat/completions",) * 8 + ("/v1/messages", "/v1/embeddings")
BATCH = 10_000


def day_of(column):
    """SQL for 'YYYY-MM-DD' of a naive UTC timestamp, on SQLite and PostgreSQL alike."""
    return func.substr(cast(column, String), 1, 10)


def seed_accounts(users, keys_per_user):
    """Create (or reuse) the seed members and their keys; returns [(user_id, key_id, name)]."""
    owners = []
    for n in range(1, users + 1):
        email = f"user{n}@{SEED_DOMAIN}"
        user = db.session.scalar(select(User).filter_by(email=email))
        if user is None:
            user = create_user(email, uuid.uuid4().hex)
        for name in KEY_NAMES[:keys_per_user]:
            key = db.session.scalar(select(ApiKey).filter_by(user_id=user.id, name=name))
            if key is None:
                key, _ = ApiKey.generate(user, name)
                db.session.add(key)
                db.session.flush()
            owners.append((user.id, key.id, name))
    db.session.commit()
    return owners


def fake_row(rng, moment, owner):
    """One plausible RequestLog row as a dict for a bulk insert."""
    user_id, key_id, key_name = owner
    model = rng.choice(SEED_MODELS)
    roll = rng.random()
    status, http = ("Success", 200) if roll < 0.96 else (
        ("Failed", rng.choice((400, 429, 502))) if roll < 0.99 else ("Timeout", 504))
    ok = status == "Success"
    prompt = rng.randint(20, 4000)
    completion = rng.randint(5, 1200) if ok else 0
    cached = rng.choice((0, 0, 0, prompt // 2))
    stream = rng.random() < 0.5
    latency = rng.randint(150, 9000)
    return {
        "created_at": moment, "request_id": "seed-" + uuid.uuid4().hex,
        "user_id": user_id, "key_id": key_id, "key_name": key_name, "model": model,
        "channel_name": rng.choice(SEED_CHANNELS), "endpoint": rng.choice(ENDPOINTS),
        "is_stream": stream, "prompt_tokens": prompt, "completion_tokens": completion,
        "cached_tokens": cached if ok else 0,
        "credits_micro": (prompt * 150 + completion * 600) // 1000 if ok else 0,
        "status": status, "http_status": http, "latency_ms": latency,
        "ttft_ms": min(latency, rng.randint(80, 900)) if stream and ok else None,
        "estimated": False, "billing": "billed" if ok else "void",
        "error": None if ok else "upstream answered " + str(http),
    }


def insert_logs(owners, rows, days, seed=None):
    """Bulk-insert `rows` log rows spread over the last `days` days, oldest first."""
    rng = random.Random(seed)
    end = utcnow()
    start = end - timedelta(days=days)
    span = (end - start) / max(rows, 1)
    done = 0
    while done < rows:
        size = min(BATCH, rows - done)
        batch = [fake_row(rng, start + span * (done + i + rng.random()), rng.choice(owners))
                 for i in range(size)]
        if db.session.get_bind().dialect.name == "postgresql":
            copy_rows(RequestLog.__tablename__, batch)
        else:
            db.session.execute(insert(RequestLog), batch)
        db.session.commit()
        done += size
    return done


def copy_rows(table, rows):
    """Load dict rows with PostgreSQL's COPY, many times faster than INSERTs for bulk loads."""
    columns = list(rows[0])
    driver = db.session.connection().connection.driver_connection  # psycopg 3
    with driver.cursor() as cursor:
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[name] for name in columns])


def rebuild_usage_daily(user_ids):
    """Recompute the UsageDaily rollup of `user_ids` from their RequestLog rows, in SQL."""
    db.session.execute(delete(UsageDaily).where(UsageDaily.user_id.in_(user_ids)))
    day = day_of(RequestLog.created_at)
    key_id = func.coalesce(RequestLog.key_id, 0)
    key_name = func.coalesce(RequestLog.key_name, literal(""))
    model = func.coalesce(RequestLog.model, literal(""))
    rollup = (select(day, RequestLog.user_id, key_id, func.max(key_name), model,
                     func.count(), func.sum(case((RequestLog.status != "Success", 1), else_=0)),
                     func.sum(RequestLog.prompt_tokens), func.sum(RequestLog.completion_tokens),
                     func.sum(RequestLog.credits_micro))
              .where(RequestLog.user_id.in_(user_ids))
              .group_by(day, RequestLog.user_id, key_id, model))
    db.session.execute(insert(UsageDaily).from_select(
        ["day", "user_id", "key_id", "key_name", "model", "requests", "failed",
         "prompt_tokens", "completion_tokens", "credits_micro"], rollup))
    db.session.commit()


def register(app):
    @app.cli.group("seed")
    def seed():
        """Fill the database with synthetic data (demos, benchmarks)."""

    @seed.command("logs")
    @click.option("--rows", type=click.IntRange(min=1), default=10_000, show_default=True)
    @click.option("--days", type=click.IntRange(min=1), default=90, show_default=True)
    @click.option("--users", type=click.IntRange(min=1), default=20, show_default=True,
                  help=f"seed members user<N>@{SEED_DOMAIN}, created if missing")
    @click.option("--keys-per-user", type=click.IntRange(1, len(KEY_NAMES)), default=3,
                  show_default=True)
    @click.option("--random-seed", type=int, default=None, help="repeatable data")
    def seed_logs(rows, days, users, keys_per_user, random_seed):
        """Insert ROWS request logs over the last DAYS days and rebuild their daily rollup."""
        began = time.monotonic()
        owners = seed_accounts(users, keys_per_user)
        insert_logs(owners, rows, days, random_seed)
        rebuild_usage_daily(sorted({owner[0] for owner in owners}))
        click.echo(f"seeded {rows} log rows over {days} days for {users} users "
                   f"in {time.monotonic() - began:.1f}s")
