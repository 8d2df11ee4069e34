"""Small query helpers every console page uses."""
from flask import abort

from extensions import db


def get_owned_or_404(model, object_id, user):
    """The row `object_id` if it belongs to `user` (admins see all); else 404, never 403."""
    row = db.session.get(model, object_id)
    if row is None or (row.user_id != user.id and not user.is_admin):
        abort(404)
    return row


class Page:
    """One page of a query: items, and whether there are neighbours."""

    def __init__(self, items, page, per_page, has_next):
        self.items = items
        self.page = page
        self.per_page = per_page
        self.has_prev = page > 1
        self.has_next = has_next


def paginate(select, page=1, per_page=50):
    """Run `select` for one page, fetching one extra row to know if another page follows."""
    page = max(int(page or 1), 1)
    rows = db.session.scalars(select.limit(per_page + 1).offset((page - 1) * per_page)).all()
    return Page(rows[:per_page], page, per_page, len(rows) > per_page)
