"""Console pages: request logs and their CSV export (same filters as query parameters)."""
from flask import Blueprint, Response, render_template, request, stream_with_context
from flask_login import current_user, login_required

from blueprints.logs.queries import (
    CSV_COLUMNS, STATUSES, LogFilters, csv_rows, emails_by_id, filter_choices, filtered_logs,
    log_page,
)
from csv_export import csv_chunks
from models import utcnow

bp = Blueprint("logs", __name__)


@bp.get("/logs")
@login_required
def index():
    """One keyset page of the viewer's logs, filtered."""
    filters = LogFilters.from_args(request.args, current_user.is_admin)
    page = log_page(filtered_logs(current_user, filters), request.args.get("before"))
    models, keys = filter_choices(current_user)
    emails = emails_by_id(page.rows) if current_user.is_admin else {}
    return render_template("logs/index.html", page=page, filters=filters, args=filters.as_args(),
                           models=models, keys=keys, statuses=STATUSES, emails=emails)


@bp.get("/logs.csv")
@login_required
def export_csv():
    """Every filtered row as CSV, streamed in batches so a million rows never sit in memory."""
    filters = LogFilters.from_args(request.args, current_user.is_admin)
    query = filtered_logs(current_user, filters)
    name = f"tokenopen-logs-{utcnow():%Y%m%d-%H%M%S}.csv"
    return Response(stream_with_context(csv_chunks(CSV_COLUMNS, csv_rows(query))),
                    mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
