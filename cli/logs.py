"""`logs prune`: request-log retention on demand (the daily rollups stay)."""
import click

from retention import prune_request_logs


def register(app):
    @app.cli.group("logs")
    def logs():
        """Request logs."""

    @logs.command("prune")
    @click.option("--older-than-days", type=click.IntRange(min=1), required=True,
                  help="Delete request logs older than this many days.")
    def logs_prune(older_than_days):
        """Delete old request logs; the dashboard's daily rollups are kept."""
        pruned = prune_request_logs(older_than_days)
        click.echo(f"pruned {pruned} request log(s) older than {older_than_days} days")
