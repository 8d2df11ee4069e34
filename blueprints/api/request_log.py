"""Writing the one RequestLog row per request and the daily usage rollup beside it."""
from sqlalchemy.dialects import postgresql, sqlite

from extensions import db
from models import RequestLog, UsageDaily, utcnow

ROLLUP_SUMS = ("requests", "failed", "prompt_tokens", "completion_tokens", "credits_micro")


def add_request_log(**fields):
    """Add the log row and bump its UsageDaily rollup, in the caller's transaction."""
    fields.setdefault("created_at", utcnow())
    log = RequestLog(**fields)
    db.session.add(log)
    if log.user_id is not None:
        _bump_rollup(log)
    return log


def _bump_rollup(log):
    day = log.created_at.strftime("%Y-%m-%d")
    values = dict(day=day, user_id=log.user_id, key_id=log.key_id or 0,
                  key_name=log.key_name or "", model=log.model or "", requests=1,
                  failed=0 if log.status == "Success" else 1,
                  prompt_tokens=log.prompt_tokens, completion_tokens=log.completion_tokens,
                  credits_micro=log.credits_micro)
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(UsageDaily).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=["day", "user_id", "key_id", "model"],
        set_={name: getattr(UsageDaily, name) + getattr(statement.excluded, name)
              for name in ROLLUP_SUMS})
    db.session.execute(statement)
