"""prices, credits, codes and billing commands."""
import sys
from datetime import timedelta

import click

from billing import (
    check_ledger, create_codes, delete_price, grant_credits, set_price, user_count,
)
from holds import sweep_lapsed
from cli.common import credits_or_fail, echo_json, fail, iso, user_or_fail
from extensions import db
from models import MAX_EXPIRY_DAYS, ModelPrice, utcnow
from money import format_credits

# Arguments like "-5" are amounts, not options.
NEGATIVE_OK = {"ignore_unknown_options": True}


def price_summary(row):
    """What `prices list --json` prints for one price (credits per 1M tokens)."""
    cached = row.input_micro if row.cached_input_micro is None else row.cached_input_micro
    written = row.input_micro if row.cache_write_micro is None else row.cache_write_micro
    return {
        "model": row.model,
        "input": format_credits(row.input_micro),
        "output": format_credits(row.output_micro),
        "cached_input": format_credits(cached),
        "cache_write": format_credits(written),
        "per_request": format_credits(row.per_request_micro),
        "per_image": format_credits(row.per_image_micro or 0),
        "per_second": format_credits(row.per_second_micro or 0),
        "input_micro": row.input_micro,
        "output_micro": row.output_micro,
        "cached_input_micro": cached,
        "cache_write_micro": written,
        "per_request_micro": row.per_request_micro,
        "per_image_micro": row.per_image_micro or 0,
        "per_second_micro": row.per_second_micro or 0,
        "updated_at": iso(row.updated_at),
    }


def register(app):
    """Attach the prices, credits, codes and billing command groups."""

    @app.cli.group("prices")
    def prices():
        """Model prices in credits per 1M tokens."""

    @prices.command("set")
    @click.argument("model")
    @click.option("--input", "input_", required=True, help="Credits per 1M input tokens.")
    @click.option("--output", required=True, help="Credits per 1M output tokens.")
    @click.option("--cached-input", help="Credits per 1M cached input tokens (default: --input).")
    @click.option("--cache-write", help="Credits per 1M tokens written to the provider's cache "
                                        "(default: --input).")
    @click.option("--per-request", default="0", show_default=True,
                  help="Flat credits per request.")
    @click.option("--per-image", default="0", show_default=True,
                  help="Flat credits per generated image.")
    @click.option("--per-second", default="0", show_default=True,
                  help="Flat credits per second of audio transcribed or translated.")
    def prices_set(model, input_, output, cached_input, cache_write, per_request, per_image,
                   per_second):
        """Create or change MODEL's price (0 everywhere makes it free)."""
        try:
            row = set_price(model, credits_or_fail(input_), credits_or_fail(output),
                            None if cached_input is None else credits_or_fail(cached_input),
                            credits_or_fail(per_request),
                            None if cache_write is None else credits_or_fail(cache_write),
                            credits_or_fail(per_image), credits_or_fail(per_second))
        except ValueError as err:
            fail(str(err))
        info = price_summary(row)
        click.echo(f"{info['model']}: input {info['input']}, output {info['output']}, "
                   f"cached input {info['cached_input']} credits per 1M tokens; "
                   f"per request {info['per_request']}")

    @prices.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def prices_list(as_json):
        """Every priced model."""
        rows = [price_summary(r) for r in
                db.session.scalars(db.select(ModelPrice).order_by(ModelPrice.model))]
        if as_json:
            echo_json(rows)
            return
        if not rows:
            click.echo("no prices set (unpriced models are refused)")
        for info in rows:
            click.echo(f"{info['model']}  input={info['input']}  output={info['output']}  "
                       f"cached_input={info['cached_input']}  per_request={info['per_request']}")

    @prices.command("delete")
    @click.argument("model")
    def prices_delete(model):
        """Remove MODEL's price; calls to it are then refused."""
        if not delete_price(model):
            fail(f"no price for model {model}")
        click.echo(f"deleted the price of {model}")

    @app.cli.group("credits")
    def credits():
        """Wallet top-ups and corrections."""

    @credits.command("grant", context_settings=NEGATIVE_OK)
    @click.argument("email")
    @click.argument("amount")
    @click.option("--note", help="Shown on the member's wallet ledger.")
    def credits_grant(email, amount, note):
        """Add AMOUNT credits to EMAIL's wallet (a negative AMOUNT deducts, never below zero)."""
        user = user_or_fail(email)
        micro = credits_or_fail(amount, allow_negative=True)
        kind = "grant" if micro > 0 else "adjustment"
        try:
            entry = grant_credits(user.id, micro, kind=kind, note=note)
        except ValueError as err:
            fail(str(err))
        verb = "granted" if micro > 0 else "deducted"
        click.echo(f"{verb} {format_credits(abs(micro))} credits "
                   f"{'to' if micro > 0 else 'from'} {user.email}; "
                   f"balance is now {format_credits(entry.balance_after_micro)}")

    @app.cli.group("codes")
    def codes():
        """Redemption codes."""

    @codes.command("create")
    @click.option("--amount", required=True, help="Credits each code is worth.")
    @click.option("--count", default=1, show_default=True, type=click.IntRange(1, 10_000),
                  help="How many codes.")
    @click.option("--expires-days", type=click.IntRange(1, MAX_EXPIRY_DAYS),
                  help="Codes expire after this many days.")
    def codes_create(amount, count, expires_days):
        """Create a batch of single-use codes; prints one code per line."""
        micro = credits_or_fail(amount)
        expires_at = utcnow() + timedelta(days=expires_days) if expires_days else None
        try:
            created = create_codes(micro, count, expires_at=expires_at)
        except ValueError as err:
            fail(str(err))
        for code in created:
            click.echo(code)

    @app.cli.group("billing")
    def billing():
        """Ledger audit and reservation sweeping."""

    @billing.command("check")
    def billing_check():
        """Recompute balances from the ledger; exit 1 and list every drift."""
        drift = check_ledger()
        if drift:
            for line in drift:
                click.echo(line)
            sys.exit(1)
        click.echo(f"ledger OK: {user_count()} users")

    @billing.command("sweep")
    @click.option("--max-age", type=int, default=0,
                  help="Also skip holds younger than this many seconds. Holds whose lease is "
                       "still renewed by a live worker are never touched, whatever the age.")
    def billing_sweep(max_age):
        """Settle holds whose worker died (lease lapsed) at their last checkpoint."""
        if max_age < 0:
            fail("--max-age must not be negative")
        settled = sweep_lapsed(max_age)
        click.echo(f"settled {settled} hold{'s' if settled != 1 else ''} whose lease lapsed")
