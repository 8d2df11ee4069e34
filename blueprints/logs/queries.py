"""The SQL behind /logs and /logs.csv: filters, keyset pages, and the CSV rows."""
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import and_, false, func, or_, select

from extensions import db
from models import RequestLog, UsageDaily, User
from money import format_credits

STATUSES = ("Success", "Failed", "Timeout")
PER_PAGE = 50


def _date(text, label, errors):
    """'2026-01-31' -> date; blank -> None; anything else -> None and a message in `errors`."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        errors.append(f"“{text[:40]}” is not a date; write the {label} date as YYYY-MM-DD.")
        return None


def _int(text):
    try:
        return int((text or "").strip())
    except ValueError:
        return None


@dataclass
class LogFilters:
    """What the viewer asked to see; empty fields do not filter."""
    date_from: date | None = None
    date_to: date | None = None
    model: str = ""
    key: str = ""
    status: str = ""
    user: str = ""  # an email; honoured for admins only
    key_id: int | None = None  # one key of one member (admins: names repeat across members)
    errors: list = field(default_factory=list, compare=False)  # filters that were refused

    @classmethod
    def from_args(cls, args, is_admin):
        """Read the filters from query parameters (the same for the page and the CSV)."""
        status = args.get("status", "").strip()
        errors = []
        return cls(date_from=_date(args.get("from"), "from", errors),
                   date_to=_date(args.get("to"), "to", errors),
                   model=args.get("model", "").strip(), key=args.get("key", "").strip(),
                   status=status if status in STATUSES else "",
                   user=args.get("user", "").strip().lower() if is_admin else "",
                   key_id=_int(args.get("key_id")) if is_admin else None, errors=errors)

    def as_args(self):
        """The filters back as query parameters, without the empty ones."""
        names = {"date_from": "from", "date_to": "to"}
        args = {}
        for field in fields(self):
            if field.name == "errors":
                continue
            value = getattr(self, field.name)
            if value:
                args[names.get(field.name, field.name)] = (
                    value.isoformat() if isinstance(value, date) else value)
        return args


def filtered_logs(viewer, filters):
    """SELECT of the RequestLog rows `viewer` may see that match `filters`, newest first."""
    query = select(RequestLog)
    if not viewer.is_admin:
        query = query.where(RequestLog.user_id == viewer.id)
    elif filters.user:
        # Resolved first: a subquery would hide the value from PostgreSQL's planner.
        user_id = db.session.scalar(select(User.id).where(User.email == filters.user))
        query = query.where(RequestLog.user_id == user_id if user_id else false())
    if filters.date_from:
        query = query.where(RequestLog.created_at >= datetime.combine(filters.date_from,
                                                                      datetime.min.time()))
    if filters.date_to:  # inclusive: the whole of the 'to' day
        query = query.where(RequestLog.created_at < datetime.combine(
            filters.date_to + timedelta(days=1), datetime.min.time()))
    if filters.model:
        query = query.where(RequestLog.model == filters.model)
    if filters.key:
        query = query.where(RequestLog.key_name == filters.key)
    if filters.key_id:
        query = query.where(RequestLog.key_id == filters.key_id)
    if filters.status:
        query = query.where(RequestLog.status == filters.status)
    return query.order_by(RequestLog.created_at.desc(), RequestLog.id.desc())


def encode_cursor(row):
    """The 'before' cursor that continues after `row`: '<iso time>~<id>'."""
    return f"{row.created_at.isoformat()}~{row.id}"


def decode_cursor(text):
    """'<iso time>~<id>' -> (datetime, id), or None when absent or malformed."""
    moment, _, row_id = (text or "").partition("~")
    try:
        return datetime.fromisoformat(moment), int(row_id)
    except ValueError:
        return None


@dataclass
class LogPage:
    """One keyset page: its rows and the cursor of the next (older) page, if any."""
    rows: list
    next_cursor: str | None
    first: bool


def log_page(query, before=None, per_page=PER_PAGE):
    """Rows of `query` strictly older than the `before` cursor — keyset, so page 1,000 costs
    what page 1 does, where OFFSET would scan every skipped row."""
    cursor = decode_cursor(before)
    if cursor:
        query = query.where(older_than(*cursor))
    rows = db.session.scalars(query.limit(per_page + 1)).all()
    more = len(rows) > per_page
    rows = rows[:per_page]
    return LogPage(rows, encode_cursor(rows[-1]) if more else None, cursor is None)


def filter_choices(viewer):
    """Models and keys for the filter drop-downs, from the small rollup table. Members get key
    names; admins get (key_id, "name · owner") pairs, since every member may have a "laptop"."""
    scope = [] if viewer.is_admin else [UsageDaily.user_id == viewer.id]
    models = db.session.scalars(select(UsageDaily.model).where(*scope, UsageDaily.model != "")
                                .distinct().order_by(UsageDaily.model)).all()
    if not viewer.is_admin:
        keys = db.session.scalars(select(UsageDaily.key_name).where(
            *scope, UsageDaily.key_name != "").distinct().order_by(UsageDaily.key_name)).all()
        return models, keys
    rows = db.session.execute(
        select(UsageDaily.key_id, func.max(UsageDaily.key_name), func.max(User.email))
        .outerjoin(User, User.id == UsageDaily.user_id)
        .where(UsageDaily.key_id != 0).group_by(UsageDaily.key_id)).all()
    keys = sorted(((key_id, f"{name} · {email or 'deleted user'}") for key_id, name, email in rows),
                  key=lambda pair: pair[1].lower())
    return models, keys


def emails_by_id(rows):
    """{user_id: email} for the users in `rows` (one query per page, admins only)."""
    ids = {row.user_id for row in rows if row.user_id}
    if not ids:
        return {}
    return dict(db.session.execute(select(User.id, User.email).where(User.id.in_(ids))).all())


CSV_COLUMNS = ("time", "request_id", "user", "key_name", "model", "channel", "endpoint",
               "stream", "prompt_tokens", "completion_tokens", "cached_tokens", "credits",
               "status", "http_status", "latency_ms", "ttft_ms", "estimated", "error")


def csv_rows(query, batch=1000):
    """The rows of `query` (filtered_logs: newest first) as CSV value tuples; numbers are
    numbers (credits a Decimal), so csv_export neutralises only the text.

    Read `batch` rows at a time, each batch in a read of its own that ends before its rows
    are yielded (keyset, after the batch's last row). One read for the whole download would
    pin SQLite's log for as long as the client takes: the checkpointer could not start it
    over, and once far past its size it holds writers back while it waits (sqlite_wal.py).
    """
    query = query.add_columns(User.email).outerjoin(User, User.id == RequestLog.user_id)
    after = None
    while True:
        page = query if after is None else query.where(older_than(*after))
        rows = db.session.execute(page.limit(batch)).all()
        records = [_csv_record(log, email) for log, email in rows]
        if rows:
            after = (rows[-1][0].created_at, rows[-1][0].id)
        db.session.rollback()  # the read ends here; nothing was written
        yield from records
        if len(rows) < batch:
            return


def older_than(moment, row_id):
    """Rows after (created_at, id) in filtered_logs' order: the keyset of pages and exports."""
    return or_(RequestLog.created_at < moment,
               and_(RequestLog.created_at == moment, RequestLog.id < row_id))


def _csv_record(log, email):
    return (log.created_at.isoformat(sep=" ", timespec="seconds"), log.request_id,
            email or "", log.key_name or "", log.model or "", log.channel_name or "",
            log.endpoint, "yes" if log.is_stream else "no", log.prompt_tokens,
            log.completion_tokens, log.cached_tokens, Decimal(format_credits(log.credits_micro)),
            log.status, log.http_status, log.latency_ms,
            "" if log.ttft_ms is None else log.ttft_ms, "yes" if log.estimated else "no",
            log.error or "")
