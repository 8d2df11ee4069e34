"""Console pages: the wallet (balance, ledger, redeem a code) and /pricing."""
from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from billing import Price, redeem_code
from blueprints.queries import paginate
from blueprints.wallet.forms import RedeemForm
from extensions import db
from models import MICRO, LedgerEntry, ModelPrice
from money import format_credits

bp = Blueprint("wallet", __name__)

LEDGER_PAGE = 50


@bp.route("/wallet", methods=["GET", "POST"])
@login_required
def wallet():
    """Balance, credits held by in-flight requests, the ledger, and the redeem form."""
    form = RedeemForm()
    if form.validate_on_submit():
        try:
            amount = redeem_code(current_user.id, form.code.data)
        except ValueError as err:
            form.code.errors.append(str(err))
        else:
            flash(f"Redeemed: {format_credits(amount)} credits were added to your wallet.",
                  "success")
            return redirect(url_for("wallet.wallet"))
    ledger = paginate(db.select(LedgerEntry).filter_by(user_id=current_user.id)
                      .order_by(LedgerEntry.id.desc()),
                      request.args.get("page", 1, type=int), LEDGER_PAGE)
    status = 400 if form.errors else 200
    return render_template("wallet/wallet.html", form=form, ledger=ledger,
                           user=current_user), status


def priced_models(group):
    """Every priced model as the viewer's group pays it: (Price after multiplier, allowed)."""
    rows = db.session.scalars(db.select(ModelPrice).order_by(ModelPrice.model)).all()
    return [(scaled_price(Price.from_row(row), group.multiplier_ppm),
             group.allows_model(row.model)) for row in rows]


def scaled_price(price, multiplier_ppm):
    """`price` times a group multiplier, each figure rounded up to a whole micro-credit."""
    def scale(micro):
        return -(-micro * multiplier_ppm // MICRO)
    return Price(price.model, scale(price.input_micro), scale(price.output_micro),
                 scale(price.cached_input_micro), scale(price.per_request_micro))


@bp.get("/pricing")
@login_required
def pricing():
    """Every priced model with the viewer's prices and whether the viewer may use it."""
    group = current_user.group
    return render_template("wallet/pricing.html", models=priced_models(group), group=group)
