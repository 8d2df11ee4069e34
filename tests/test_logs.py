"""/logs and /logs.csv: visibility, filters, keyset pagination and the CSV export."""
import csv
import html
import io
import re
import sqlite3
from datetime import datetime, timedelta

import pytest

from tests.support import insert_logs, login_session, longest_stall, make_key, make_user

T0 = datetime(2026, 3, 10, 12, 0, 0)


def request_ids(response):
    """Request ids of the table rows, in page order."""
    return re.findall(r'data-request-id="([^"]+)"', response.get_data(as_text=True))


def next_link(response):
    """The 'Older' link of a logs page, or None on the last page."""
    match = re.search(r'rel="next" href="([^"]+)"', response.get_data(as_text=True))
    return html.unescape(match.group(1)) if match else None


def csv_records(response):
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


@pytest.fixture
def people(app):
    """An admin and two members, each member with logs of their own."""
    with app.app_context():
        ids = {"admin": make_user("admin@example.com", is_admin=True),
               "alice": make_user("alice@example.com"), "bob": make_user("bob@example.com")}
        make_key("alice@example.com", name="laptop")
        insert_logs([
            {"user_id": ids["alice"], "request_id": "a-old", "created_at": T0 - timedelta(days=3),
             "model": "gpt-4o", "key_name": "laptop", "prompt_tokens": 120,
             "completion_tokens": 30, "cached_tokens": 20, "credits_micro": 1_234,
             "is_stream": True, "ttft_ms": 210, "latency_ms": 900, "channel_name": "openai-a"},
            {"user_id": ids["alice"], "request_id": "a-fail", "created_at": T0 - timedelta(days=1),
             "model": "gpt-4o-mini", "key_name": "ci", "status": "Failed", "http_status": 502,
             "credits_micro": 0, "completion_tokens": 0, "error": "upstream said no"},
            {"user_id": ids["alice"], "request_id": "a-new", "created_at": T0,
             "model": "gpt-4o-mini", "key_name": "laptop", "credits_micro": 2_500_000},
            {"user_id": ids["bob"], "request_id": "b-1", "created_at": T0 - timedelta(hours=1),
             "model": "gpt-4o", "key_name": "laptop", "status": "Timeout", "http_status": 504},
        ])
    return ids


def test_anonymous_visitors_are_sent_to_login(client):
    for url in ("/logs", "/logs.csv"):
        response = client.get(url)
        assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_members_see_only_their_own_rows(client, people):
    login_session(client, people["alice"])
    assert request_ids(client.get("/logs")) == ["a-new", "a-fail", "a-old"]
    # A member cannot widen the view with the admin-only user filter.
    assert request_ids(client.get("/logs?user=bob@example.com")) == ["a-new", "a-fail", "a-old"]
    assert [r["request_id"] for r in csv_records(client.get("/logs.csv"))] == [
        "a-new", "a-fail", "a-old"]
    assert "b-1" not in client.get("/logs.csv?user=bob@example.com").get_data(as_text=True)


def test_admins_see_everyone_and_filter_by_user(client, people):
    login_session(client, people["admin"])
    page = client.get("/logs")
    assert request_ids(page) == ["a-new", "b-1", "a-fail", "a-old"]
    assert "bob@example.com" in page.get_data(as_text=True)
    assert request_ids(client.get("/logs?user=BOB@example.com")) == ["b-1"]
    assert request_ids(client.get("/logs?user=nobody@example.com")) == []


@pytest.mark.parametrize("query, expected", [
    ("model=gpt-4o", ["b-1", "a-old"]),
    ("key=laptop", ["a-new", "b-1", "a-old"]),
    ("status=Failed", ["a-fail"]),
    ("status=Timeout", ["b-1"]),
    ("status=bogus", ["a-new", "b-1", "a-fail", "a-old"]),  # unknown values do not filter
    ("from=2026-03-09", ["a-new", "b-1", "a-fail"]),
    ("to=2026-03-09", ["a-fail", "a-old"]),  # 'to' includes the whole day
    ("from=2026-03-07&to=2026-03-07", ["a-old"]),
    ("from=2026-03-10&model=gpt-4o-mini&key=laptop&status=Success", ["a-new"]),
])
def test_filters(client, people, query, expected):
    login_session(client, people["admin"])
    assert request_ids(client.get("/logs?" + query)) == expected
    assert [r["request_id"] for r in csv_records(client.get("/logs.csv?" + query))] == expected


def test_row_shows_every_spec_field(client, people):
    login_session(client, people["alice"])
    text = client.get("/logs?model=gpt-4o").get_data(as_text=True)
    row = text[text.index('data-request-id="a-old"'):]
    detail = row[row.index("</tr>") + 5:]
    row, detail = row[:row.index("</tr>")], detail[:detail.index("</tr>")]

    def clean(html):
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()
    cells = [clean(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    # The row: what a person scans; Details: everything else the spec lists for a log row.
    assert cells == ["2026-03-07 12:00:00", "gpt-4o laptop", "Success", "120 / 30",
                     "0.001234", "900 ms", "Details"]
    facts = dict(re.findall(r"<dt>(.*?)</dt><dd[^>]*>(.*?)</dd>", detail, re.S))
    assert {k: clean(v) for k, v in facts.items()} == {
        "Request ID": "a-old Copy", "Key": "laptop", "Channel": "openai-a",
        "Endpoint": "/v1/chat/completions · stream", "HTTP status": "200",
        "Tokens": "120 in (20 cached) · 30 out", "Cost": "0.001234 credits",
        "Latency": "900 ms", "Time to first token": "210 ms"}


def test_keyset_pagination_has_no_duplicates_or_gaps(app, client):
    with app.app_context():
        user_id = make_user("many@example.com")
        # 50 rows share one timestamp, so the cursor must break ties by id.
        rows = [{"user_id": user_id, "request_id": f"r{n:03d}",
                 "created_at": T0 - timedelta(minutes=0 if n < 50 else n)} for n in range(123)]
        insert_logs(rows)
    login_session(client, user_id)
    seen, url, pages = [], "/logs", 0
    while url:
        response = client.get(url)
        assert response.status_code == 200
        ids = request_ids(response)
        assert len(ids) == (50 if pages < 2 else 23)
        seen += ids
        url, pages = next_link(response), pages + 1
    assert pages == 3
    assert len(seen) == len(set(seen)) == 123
    expected = [r[2] for r in sorted(
        stored_rows(app, user_id), key=lambda r: (r[1], r[0]), reverse=True)]
    assert seen == expected


def stored_rows(app, user_id):
    """(id, created_at, request_id) of the user's rows, read back from the database."""
    from extensions import db
    from models import RequestLog
    with app.app_context():
        rows = db.session.execute(db.select(RequestLog.id, RequestLog.created_at,
                                           RequestLog.request_id)
                                  .filter_by(user_id=user_id)).all()
    return [(row.id, row.created_at, row.request_id) for row in rows]


def test_pagination_keeps_filters_and_rejects_junk_cursors(app, client):
    with app.app_context():
        user_id = make_user("many@example.com")
        insert_logs([{"user_id": user_id, "created_at": T0 - timedelta(minutes=n),
                      "model": "gpt-4o" if n % 2 else "gpt-4o-mini", "request_id": f"r{n:03d}"}
                     for n in range(120)])
    login_session(client, user_id)
    first = client.get("/logs?model=gpt-4o")
    link = next_link(first)
    assert "model=gpt-4o" in link
    second = client.get(link)
    assert request_ids(second) == [f"r{n:03d}" for n in range(101, 120, 2)]
    assert next_link(second) is None
    assert request_ids(client.get("/logs?before=not-a-cursor")) == request_ids(client.get("/logs"))


def test_csv_export_has_all_columns_and_decimal_credits(client, people):
    login_session(client, people["admin"])
    response = client.get("/logs.csv?model=gpt-4o")
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    records = csv_records(response)
    assert list(records[0]) == [
        "time", "request_id", "user", "key_name", "model", "channel", "endpoint", "stream",
        "prompt_tokens", "completion_tokens", "cached_tokens", "credits", "status",
        "http_status", "latency_ms", "ttft_ms", "estimated", "error"]
    old = records[1]
    assert (old["request_id"], old["user"], old["credits"], old["prompt_tokens"],
            old["cached_tokens"], old["stream"], old["ttft_ms"]) == (
        "a-old", "alice@example.com", "0.001234", "120", "20", "yes", "210")
    assert records[0]["status"] == "Timeout" and records[0]["ttft_ms"] == ""


def test_csv_streams_many_rows(app, client):
    with app.app_context():
        user_id = make_user("many@example.com")
        insert_logs([{"user_id": user_id, "created_at": T0 - timedelta(seconds=n),
                      "credits_micro": n} for n in range(2600)])
    login_session(client, user_id)
    response = client.get("/logs.csv")
    assert response.is_streamed
    records = csv_records(response)
    assert len(records) == 2600
    assert records[0]["credits"] == "0" and records[-1]["credits"] == "0.002599"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_csv_download_holds_no_read_open_between_batches(app, client, tmp_path):
    """SQLite: while a client reads the export, the log can be started over (a RESTART
    checkpoint completes) between two batches of rows; one read for the whole download
    pinned it until the last row."""
    with app.app_context():
        user_id = make_user("export@example.com")
        insert_logs([{"user_id": user_id, "created_at": T0 - timedelta(seconds=n)}
                     for n in range(2500)])
    login_session(client, user_id)
    response = client.get("/logs.csv", buffered=False)
    chunks = iter(response.response)
    first = next(chunks)  # the first 500 rows: the first batch of 1,000 has been read
    other = sqlite3.connect(f"{tmp_path}/test.db", timeout=0)
    other.execute("UPDATE users SET balance_micro = balance_micro WHERE id = ?", (user_id,))
    other.commit()  # something in the log for the checkpoint to copy
    busy, frames, copied = other.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    other.close()
    assert busy == 0 and frames == copied
    rest = "".join(chunk.decode() if isinstance(chunk, bytes) else chunk for chunk in chunks)
    response.close()
    records = list(csv.DictReader(io.StringIO(
        (first.decode() if isinstance(first, bytes) else first) + rest)))
    assert len(records) == 2500 and len({r["request_id"] for r in records}) == 2500
    assert [r["time"] for r in records] == sorted((r["time"] for r in records), reverse=True)


def test_empty_states(client, people):
    login_session(client, people["bob"])
    assert "No requests match these filters" in client.get("/logs?model=nope").get_data(as_text=True)
    with client.application.app_context():
        newcomer = make_user("new@example.com")
    login_session(client, newcomer)
    assert "No requests yet" in client.get("/logs").get_data(as_text=True)


def test_a_gevent_worker_keeps_serving_while_it_exports_a_big_csv(tmp_path):
    """30,000 rows exported by a gevent worker on SQLite (whose calls block the thread, as
    writing to a client that reads fast never waits): its other greenlets wait about a chunk
    at most, not the whole export (~1.1 s here before chunks gave way)."""
    rows, stall = longest_stall(f"""
        from app import create_app
        from bootstrap import ensure_default_group
        from extensions import db
        from models import RequestLog, utcnow
        from tests.support import login_session, make_user
        app = create_app({{"SQLALCHEMY_DATABASE_URI": "sqlite:///{tmp_path}/db.sqlite",
                          "TESTING": True, "SECRET_KEY": "test"}})
        with app.app_context():
            db.create_all()
            ensure_default_group()
            admin = make_user("admin@example.com", is_admin=True)
            now = utcnow()
            db.session.execute(db.insert(RequestLog), [dict(
                request_id=f"r-{{i}}", endpoint="chat", status="Success", http_status=200,
                model="m", key_name="k", created_at=now, user_id=admin) for i in range(30_000)])
            db.session.commit()
        client = app.test_client()
        login_session(client, admin)
        client.get("/logs.csv?model=none").close()  # warm: the query compiled
        def export():
            answer = client.get("/logs.csv")
            return sum(chunk.count(b"\\n") for chunk in answer.response) - 1  # the header
        """, "export()")
    assert rows == 30_000
    assert stall < 0.2, f"the worker's greenlets were held up {stall * 1000:.0f} ms"
