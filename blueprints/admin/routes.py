"""Admin console: channels, prices, groups, users, redemption codes and settings.

Everything the CLI does, a person can do here. Every view is admin-only; every
change is a CSRF-protected POST whose form validates inline.
"""
from datetime import timedelta
from decimal import Decimal

from flask import (Blueprint, Response, abort, current_app, flash, redirect,
                   render_template, request, session, stream_with_context, url_for)
from flask_login import current_user
from sqlalchemy import func, or_
from wtforms.fields.choices import SelectChoice

from blueprints.admin import channel_test
from blueprints.admin.forms import (BalanceForm, ChannelForm, CodesForm,
                                    GroupForm, PasswordForm, PriceForm, SettingsForm,
                                    UserCreateForm, UserGroupForm, parse_models_spec)
from holds import sweep_lapsed
from billing import (check_ledger, create_codes,
                                    delete_price, grant_credits, set_price,
                                    user_count)
from blueprints.auth.access import admin_required
from blueprints.keys.forms import CreateKeyForm
from blueprints.queries import paginate
from bootstrap import DEFAULT_GROUP, create_user
from csv_export import csv_chunks
from extensions import db
from give_way import in_native_thread
from models import (ApiKey, Channel, ChannelModel, Group, LedgerEntry, ModelPrice, RedemptionCode,
                    Setting, UsageDaily, User, utcnow)
from money import format_credits

bp = Blueprint("admin", __name__, url_prefix="/admin")

CODE_STATUSES = ("all", "unused", "redeemed", "expired", "revoked")
NEW_CODE_BATCH = "admin_new_code_batch"  # session slot: the batch to show in full once


def _invalid(template, **context):
    """Re-render a form page with its inline errors, as a 400: the submission was refused."""
    return render_template(template, **context), 400


# --- index -------------------------------------------------------------------------------

@bp.get("")
@admin_required
def index():
    """Links to every admin page, with a few counts."""
    now = utcnow()
    cooling = (Channel.cooldown_until.is_not(None)) & (Channel.cooldown_until > now)
    counts = {
        "users": db.session.scalar(db.select(func.count(User.id))),
        "active_channels": db.session.scalar(
            db.select(func.count(Channel.id)).where(Channel.enabled, ~cooling)),
        "cooldown_channels": db.session.scalar(
            db.select(func.count(Channel.id)).where(Channel.enabled, cooling)),
        "priced_models": db.session.scalar(db.select(func.count(ModelPrice.id))),
        "unpriced_models": len(unpriced_models()),
        "unused_codes": db.session.scalar(db.select(func.count(RedemptionCode.id)).where(
            RedemptionCode.redeemed_at.is_(None), RedemptionCode.revoked_at.is_(None))),
    }
    return render_template("admin/index.html", counts=counts, steps=setup_steps(counts))


def setup_steps(counts):
    """The first-day checklist: connect a provider, test it, price its models, invite people."""
    upstreams = db.session.scalar(db.select(func.count(Channel.id)).where(Channel.type != "mock"))
    tested = db.session.scalar(db.select(func.count(Channel.id)).where(
        Channel.last_test_ok.is_(True)))
    codes = db.session.scalar(db.select(func.count(RedemptionCode.id)))
    return [
        {"id": "channel", "done": bool(upstreams), "title": "Connect a provider",
         "text": "Add a channel with your OpenAI, Anthropic, Gemini or compatible API key.",
         "url": url_for(".channel_new"), "action": "Add a channel"},
        {"id": "test", "done": bool(tested), "title": "Test it",
         "text": "Press Test on the channel: a one-token call proves the key and URL work.",
         "url": url_for(".channels"), "action": "Open channels"},
        {"id": "prices", "done": bool(counts["priced_models"]) and not counts["unpriced_models"],
         "title": "Price its models",
         "text": "A model without a price is refused; a price of 0 makes it free.",
         "url": url_for(".prices"), "action": "Set prices"},
        {"id": "invite", "done": counts["users"] > 1 or bool(codes), "title": "Invite your team",
         "text": "Create accounts, or generate redemption codes that give credits to new members.",
         "url": url_for(".codes"), "action": "Create codes"},
    ]


# --- channels ----------------------------------------------------------------------------

@bp.get("/channels")
@admin_required
def channels():
    """Every channel with its models, routing numbers and health."""
    rows = db.session.scalars(db.select(Channel).order_by(Channel.priority.desc(),
                                                          Channel.name)).all()
    return render_template("admin/channels.html", channels=rows, now=utcnow())


def _name_taken(model, name, own_id=None):
    query = db.select(model.id).where(model.name == name)
    if own_id is not None:
        query = query.where(model.id != own_id)
    return db.session.scalar(query) is not None


def _key_given(form, channel):
    """A channel is never saved without a key by accident: a blank key keeps the stored one,
    and a channel with none at all needs the explicit "no API key" box (or type mock)."""
    if form.api_key.data or form.no_key.data or form.type.data == "mock":
        return True
    if channel is not None and channel.api_key_stored:  # a key is stored (never decrypted here)
        return True
    form.api_key.errors.append("Enter the provider's API key, or tick “This upstream needs no "
                               "API key” (e.g. Ollama or vLLM without auth).")
    return False


def _save_channel(form, channel):
    """Copy a validated ChannelForm onto `channel`; a blank key keeps the stored one."""
    before = (channel.type, channel.base_url, channel.api_key, channel.models_spec
              if channel.id else "")
    channel.name = form.name.data.strip()
    channel.type = form.type.data
    channel.base_url = form.base_url.data or ""
    if form.api_key.data:
        channel.api_key = form.api_key.data.strip()
    elif form.no_key.data:
        channel.api_key = ""
    channel.priority = form.priority.data
    channel.weight = form.weight.data
    channel.enabled = form.enabled.data
    spec = ",".join(public if public == upstream else f"{public}={upstream}"
                    for public, upstream in parse_models_spec(form.models.data))
    if spec != channel.models_spec:
        channel.set_models(spec)
    if before != (channel.type, channel.base_url, channel.api_key, spec):
        channel.last_test_ok = None  # an old test says nothing about new settings


@bp.route("/channels/new", methods=["GET", "POST"])
@admin_required
def channel_new():
    """Add a channel."""
    form = ChannelForm()
    if form.validate_on_submit() and _key_given(form, None):
        if _name_taken(Channel, form.name.data.strip()):
            form.name.errors.append("A channel with this name already exists.")
        else:
            channel = Channel()
            db.session.add(channel)
            _save_channel(form, channel)
            db.session.commit()
            flash(f"Channel {channel.name} added. Press Test to try it.", "ok")
            return redirect(url_for(".channels"))
    if form.is_submitted():
        return _invalid("admin/channel_form.html", form=form, channel=None)
    return render_template("admin/channel_form.html", form=form, channel=None)


@bp.route("/channels/<int:channel_id>/edit", methods=["GET", "POST"])
@admin_required
def channel_edit(channel_id):
    """Edit a channel; the API key field starts blank and blank keeps the old key."""
    channel = db.get_or_404(Channel, channel_id)
    # Filled from a dict, not obj=channel: the form must never hold (or decrypt) the key.
    form = ChannelForm(data={
        "name": channel.name, "type": channel.type, "base_url": channel.base_url,
        "models": channel.models_spec, "priority": channel.priority, "weight": channel.weight,
        "enabled": channel.enabled,
        "no_key": not channel.api_key_stored and channel.type != "mock",
    } if request.method == "GET" else None)
    if form.validate_on_submit() and _key_given(form, channel):
        if _name_taken(Channel, form.name.data.strip(), channel.id):
            form.name.errors.append("A channel with this name already exists.")
        else:
            _save_channel(form, channel)
            db.session.commit()
            flash(f"Channel {channel.name} saved.", "ok")
            return redirect(url_for(".channels"))
    if form.is_submitted():
        return _invalid("admin/channel_form.html", form=form, channel=channel)
    return render_template("admin/channel_form.html", form=form, channel=channel)


@bp.post("/channels/<int:channel_id>/toggle")
@admin_required
def channel_toggle(channel_id):
    """Enable a disabled channel or disable an enabled one."""
    channel = db.get_or_404(Channel, channel_id)
    channel.enabled = not channel.enabled
    db.session.commit()
    flash(f"Channel {channel.name} {'enabled' if channel.enabled else 'disabled'}.", "ok")
    return redirect(url_for(".channels"))


@bp.post("/channels/<int:channel_id>/delete")
@admin_required
def channel_delete(channel_id):
    """Delete a channel; its log rows keep the channel's name."""
    channel = db.get_or_404(Channel, channel_id)
    name = channel.name
    db.session.delete(channel)
    db.session.commit()
    flash(f"Channel {name} deleted.", "ok")
    return redirect(url_for(".channels"))


@bp.post("/channels/<int:channel_id>/test")
@admin_required
def channel_test_view(channel_id):
    """Send a tiny chat request through the channel and show the latency or the error."""
    channel = db.get_or_404(Channel, channel_id)
    ok, latency_ms, message = channel_test.test_channel(channel)
    db.session.commit()
    if ok:
        flash(f"Test of {channel.name}: OK, {message}", "ok")
    else:
        took = f" after {latency_ms} ms" if latency_ms is not None else ""
        flash(f"Test of {channel.name} failed{took}: {message}", "error")
    return redirect(url_for(".channels"))


# --- prices ------------------------------------------------------------------------------

def unpriced_models():
    """Public model names some channel serves but no price row covers (refused as unpriced)."""
    priced = db.select(ModelPrice.model)
    return db.session.scalars(
        db.select(ChannelModel.public_name).where(ChannelModel.public_name.not_in(priced))
        .distinct().order_by(ChannelModel.public_name)).all()


@bp.get("/prices")
@admin_required
def prices():
    """Every model price, and the served models that have none."""
    rows = db.session.scalars(db.select(ModelPrice).order_by(ModelPrice.model)).all()
    served = set(db.session.scalars(db.select(ChannelModel.public_name).distinct()))
    return render_template("admin/prices.html", prices=rows, unpriced=unpriced_models(),
                           served=served)


@bp.route("/prices/set", methods=["GET", "POST"])
@admin_required
def price_set():
    """Create or replace the price of one model (`?model=` pre-fills an existing one)."""
    form = PriceForm()
    existing = None
    if request.method == "GET":
        form.model.data = request.args.get("model", "").strip()
        existing = db.session.scalar(db.select(ModelPrice).filter_by(model=form.model.data))
        if existing is not None:
            form.input.data = format_credits(existing.input_micro)
            form.output.data = format_credits(existing.output_micro)
            form.cached_input.data = ("" if existing.cached_input_micro is None
                                      else format_credits(existing.cached_input_micro))
            form.per_request.data = format_credits(existing.per_request_micro)
    if form.validate_on_submit():
        model = form.model.data.strip()
        # A blank cached-input price (None) charges cached tokens at the input price.
        set_price(model, form.input.micro, form.output.micro, form.cached_input.micro,
                  form.per_request.micro or 0)
        flash(f"Price of {model} saved.", "ok")
        return redirect(url_for(".prices"))
    if form.is_submitted():
        return _invalid("admin/price_form.html", form=form, existing=None)
    return render_template("admin/price_form.html", form=form, existing=existing)


@bp.post("/prices/<int:price_id>/delete")
@admin_required
def price_delete(price_id):
    """Delete a price; the model is then refused until priced again."""
    row = db.get_or_404(ModelPrice, price_id)
    model = row.model
    delete_price(model)
    flash(f"Price of {model} deleted; calls to it are refused until it has a price.", "ok")
    return redirect(url_for(".prices"))


# --- groups ------------------------------------------------------------------------------

@bp.get("/groups")
@admin_required
def groups():
    """Every group with its limits, multiplier and member count."""
    members = dict(db.session.execute(
        db.select(User.group_id, func.count(User.id)).group_by(User.group_id)).all())
    rows = db.session.scalars(db.select(Group).order_by(Group.name)).all()
    return render_template("admin/groups.html", groups=rows, members=members,
                           default_group=DEFAULT_GROUP)


def _save_group(form, group):
    group.name = form.name.data.strip()
    group.models = form.models.data
    group.rpm = form.rpm.data
    group.tpm = form.tpm.data
    group.concurrency = form.concurrency.data or 0
    group.multiplier_ppm = form.multiplier_ppm


def _group_name_ok(form, group=None):
    """Inline errors for a taken name, or for renaming the group new users join."""
    name = form.name.data.strip()
    if _name_taken(Group, name, group.id if group else None):
        form.name.errors.append("A group with this name already exists.")
        return False
    if group is not None and group.name == DEFAULT_GROUP and name != DEFAULT_GROUP:
        form.name.errors.append(f"New users join “{DEFAULT_GROUP}”; it cannot be renamed.")
        return False
    return True


@bp.route("/groups/new", methods=["GET", "POST"])
@admin_required
def group_new():
    """Create a group."""
    form = GroupForm()
    if form.validate_on_submit() and _group_name_ok(form):
        group = Group()
        _save_group(form, group)
        db.session.add(group)
        db.session.commit()
        flash(f"Group {group.name} created.", "ok")
        return redirect(url_for(".groups"))
    if form.is_submitted():
        return _invalid("admin/group_form.html", form=form, group=None)
    return render_template("admin/group_form.html", form=form, group=None)


@bp.route("/groups/<int:group_id>/edit", methods=["GET", "POST"])
@admin_required
def group_edit(group_id):
    """Edit a group's models, limits and multiplier."""
    group = db.get_or_404(Group, group_id)
    form = GroupForm(obj=group if request.method == "GET" else None)
    if request.method == "GET":
        form.multiplier.data = format_credits(group.multiplier_ppm)
    if form.validate_on_submit() and _group_name_ok(form, group):
        _save_group(form, group)
        db.session.commit()
        flash(f"Group {group.name} saved.", "ok")
        return redirect(url_for(".groups"))
    if form.is_submitted():
        return _invalid("admin/group_form.html", form=form, group=group)
    return render_template("admin/group_form.html", form=form, group=group)


@bp.post("/groups/<int:group_id>/delete")
@admin_required
def group_delete(group_id):
    """Delete an empty group (never the default one)."""
    group = db.get_or_404(Group, group_id)
    members = db.session.scalar(db.select(func.count(User.id)).filter_by(group_id=group.id))
    if group.name == DEFAULT_GROUP:
        flash(f"Group {group.name} is where new users join; it cannot be deleted.", "error")
    elif members:
        flash(f"Group {group.name} still has {members} member{'s' if members != 1 else ''}; "
              f"move them to another group first.", "error")
    else:
        db.session.delete(group)
        db.session.commit()
        flash(f"Group {group.name} deleted.", "ok")
    return redirect(url_for(".groups"))


# --- users -------------------------------------------------------------------------------

def _group_choices():
    return [SelectChoice(g.name) for g in db.session.scalars(db.select(Group).order_by(Group.name))]


@bp.get("/users")
@admin_required
def users():
    """Users, newest first, searchable by email."""
    q = request.args.get("q", "").strip()
    query = db.select(User).order_by(User.id.desc())
    if q:
        query = query.where(User.email.ilike(f"%{q.lower()}%"))
    page = paginate(query, request.args.get("page", 1, type=int), per_page=50)
    return render_template("admin/users.html", page=page, q=q,
                           activity=user_activity([u.id for u in page.items]))


SPEND_DAYS = 30


def user_activity(user_ids):
    """{user_id: (credits spent in the last 30 days, last active time)} for one page of users,
    from the daily rollup and the keys' last use: two grouped queries, not one per user."""
    if not user_ids:
        return {}
    since = (utcnow() - timedelta(days=SPEND_DAYS - 1)).date().isoformat()
    spent = dict(db.session.execute(
        db.select(UsageDaily.user_id, func.sum(UsageDaily.credits_micro))
        .where(UsageDaily.user_id.in_(user_ids), UsageDaily.day >= since)
        .group_by(UsageDaily.user_id)).all())
    last = dict(db.session.execute(
        db.select(ApiKey.user_id, func.max(ApiKey.last_used_at))
        .where(ApiKey.user_id.in_(user_ids)).group_by(ApiKey.user_id)).all())
    return {uid: (int(spent.get(uid) or 0), last.get(uid)) for uid in user_ids}


@bp.route("/users/new", methods=["GET", "POST"])
@admin_required
def user_new():
    """Create a user with a password, a group and optionally admin rights."""
    form = UserCreateForm()
    form.group.choices = _group_choices()
    if request.method == "GET":
        form.group.data = DEFAULT_GROUP
    if form.validate_on_submit():
        try:
            user = create_user(form.email.data, form.password.data,
                               is_admin=form.is_admin.data, group_name=form.group.data)
        except ValueError as err:
            db.session.rollback()
            form.email.errors.append(str(err))
        else:
            db.session.commit()
            flash(f"User {user.email} created.", "ok")
            return redirect(url_for(".user_detail", user_id=user.id))
    if form.is_submitted():
        return _invalid("admin/user_new.html", form=form)
    return render_template("admin/user_new.html", form=form)


def _user_page(user, status=200, **forms):
    """The user page with its forms; a form passed in keeps its submitted data and errors."""
    group_form = forms.get("group_form") or UserGroupForm(formdata=None, group=user.group.name)
    group_form.group.choices = _group_choices()
    ledger = paginate(db.select(LedgerEntry).filter_by(user_id=user.id)
                      .order_by(LedgerEntry.id.desc()),
                      request.args.get("page", 1, type=int), per_page=25)
    admins = db.session.scalar(db.select(func.count(User.id)).filter_by(is_admin=True))
    keys = db.session.scalars(db.select(ApiKey).filter_by(user_id=user.id)
                              .order_by(ApiKey.id.desc())).all()
    return render_template(
        "admin/user_detail.html", user=user, ledger=ledger, group_form=group_form,
        balance_form=forms.get("balance_form") or BalanceForm(formdata=None),
        password_form=forms.get("password_form") or PasswordForm(formdata=None),
        key_form=forms.get("key_form") or CreateKeyForm(formdata=None),
        keys=keys, new_key=forms.get("new_key"), now=utcnow(),
        error=forms.get("error"), admins=admins), status


@bp.get("/users/<int:user_id>")
@admin_required
def user_detail(user_id):
    """One user: group, status, admin rights, balance adjustment and ledger."""
    return _user_page(db.get_or_404(User, user_id))


@bp.post("/users/<int:user_id>/group")
@admin_required
def user_group(user_id):
    """Move a user to another group."""
    user = db.get_or_404(User, user_id)
    form = UserGroupForm()
    form.group.choices = _group_choices()
    if not form.validate_on_submit():
        return _user_page(user, 400, group_form=form)
    user.group = db.session.scalar(db.select(Group).filter_by(name=form.group.data))
    db.session.commit()
    flash(f"{user.email} is now in group {user.group.name}.", "ok")
    return redirect(url_for(".user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/toggle-disabled")
@admin_required
def user_toggle_disabled(user_id):
    """Disable or re-enable a user's console login and keys (never your own)."""
    user = db.get_or_404(User, user_id)
    if user.id == current_user.id and not user.disabled:
        return _user_page(user, 400, error="You cannot disable your own account.")
    user.disabled = not user.disabled
    db.session.commit()
    flash(f"{user.email} {'disabled' if user.disabled else 'enabled'}.", "ok")
    return redirect(url_for(".user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/toggle-admin")
@admin_required
def user_toggle_admin(user_id):
    """Grant or remove admin rights (the last admin keeps them)."""
    user = db.get_or_404(User, user_id)
    if user.is_admin:
        admins = db.session.scalar(db.select(func.count(User.id)).filter_by(is_admin=True))
        if admins <= 1:
            return _user_page(user, 400, error="This is the last admin; make someone else "
                                               "an admin first.")
    user.is_admin = not user.is_admin
    db.session.commit()
    flash(f"{user.email} is {'now an admin' if user.is_admin else 'no longer an admin'}.", "ok")
    if user.id == current_user.id and not user.is_admin:
        return redirect("/")
    return redirect(url_for(".user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/balance")
@admin_required
def user_balance(user_id):
    """Add or deduct credits with a note; every change is a ledger row."""
    user = db.get_or_404(User, user_id)
    form = BalanceForm()
    if not form.validate_on_submit():
        return _user_page(user, 400, balance_form=form)
    deduct = form.direction.data == "deduct"
    amount = -form.amount.micro if deduct else form.amount.micro
    try:
        grant_credits(user.id, amount, kind="adjustment" if deduct else "grant",
                      note=form.note.data or None, created_by_id=current_user.id)
    except ValueError as err:  # e.g. deducting more than the available balance
        user = db.session.get(User, user_id)
        form.amount.errors.append(str(err))
        return _user_page(user, 400, balance_form=form)
    db.session.refresh(user)
    verb = "Deducted" if deduct else "Added"
    flash(f"{verb} {format_credits(abs(amount))} credits; {user.email} now has "
          f"{format_credits(user.balance_micro)}.", "ok")
    return redirect(url_for(".user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/password")
@admin_required
def user_password(user_id):
    """Set a user's password (e.g. one they forgot)."""
    user = db.get_or_404(User, user_id)
    form = PasswordForm()
    if not form.validate_on_submit():
        return _user_page(user, 400, password_form=form)
    user.set_password(form.password.data)
    db.session.commit()
    flash(f"Password of {user.email} changed.", "ok")
    return redirect(url_for(".user_detail", user_id=user.id))


@bp.post("/users/<int:user_id>/keys")
@admin_required
def user_key_create(user_id):
    """Create an API key for a user; the full key is shown in this one response only."""
    user = db.get_or_404(User, user_id)
    form = CreateKeyForm()
    if form.validate_on_submit():
        name = form.name.data.strip()
        if db.session.scalar(db.select(ApiKey.id).filter_by(user_id=user.id, name=name)):
            form.name.errors.append(f"{user.email} already has a key with this name.")
        else:
            key, full_key = ApiKey.generate(user, name, **form.key_fields())
            db.session.add(key)
            db.session.commit()
            return _user_page(user, new_key={"name": key.name, "key": full_key})
    return _user_page(user, 400, key_form=form)


def _user_key(user_id, key_id):
    key = db.get_or_404(ApiKey, key_id)
    if key.user_id != user_id:
        abort(404)
    return key


@bp.post("/users/<int:user_id>/keys/<int:key_id>/toggle")
@admin_required
def user_key_toggle(user_id, key_id):
    """Disable or re-enable one of a user's keys."""
    key = _user_key(user_id, key_id)
    key.disabled = not key.disabled
    db.session.commit()
    flash(f"Key “{key.name}” is {'disabled' if key.disabled else 'enabled'}.", "ok")
    return redirect(url_for(".user_detail", user_id=user_id, _anchor="keys"))


@bp.post("/users/<int:user_id>/keys/<int:key_id>/delete")
@admin_required
def user_key_delete(user_id, key_id):
    """Delete one of a user's keys; its log rows keep the key's name."""
    key = _user_key(user_id, key_id)
    name = key.name
    db.session.delete(key)
    db.session.commit()
    flash(f"Key “{name}” is deleted.", "ok")
    return redirect(url_for(".user_detail", user_id=user_id, _anchor="keys"))


# --- billing maintenance -----------------------------------------------------------------

@bp.post("/billing/check")
@admin_required
def billing_check():
    """Prove sum(ledger) == balance for every user, as `flask billing check` does. Its scans
    of the whole ledger run in a native thread: the worker's other requests go on."""
    app = current_app._get_current_object()

    def check():
        with app.app_context():
            return check_ledger(), user_count()
    drift, users = in_native_thread(check)
    if drift:
        flash("Ledger drift found: " + "; ".join(drift[:20])
              + (f" … and {len(drift) - 20} more" if len(drift) > 20 else ""), "error")
    else:
        flash(f"Ledger OK: balances match the ledger for all {users} users.", "ok")
    return redirect(url_for(".index"))


@bp.post("/billing/sweep")
@admin_required
def billing_sweep():
    """Settle holds whose worker died (lease lapsed), as `flask billing sweep` does."""
    settled = sweep_lapsed()
    flash(f"Settled {settled} hold{'s' if settled != 1 else ''} whose worker stopped renewing "
          "its lease (charged at their last checkpoint).", "ok")
    return redirect(url_for(".index"))


# --- redemption codes --------------------------------------------------------------------

def _codes_query(status, batch):
    now = utcnow()
    query = db.select(RedemptionCode).order_by(RedemptionCode.id.desc())
    if batch:
        query = query.where(RedemptionCode.batch == batch)
    unredeemed = RedemptionCode.redeemed_at.is_(None)
    live = or_(RedemptionCode.expires_at.is_(None), RedemptionCode.expires_at > now)
    revoked = RedemptionCode.revoked_at.is_not(None)
    if status == "unused":
        query = query.where(unredeemed, live, ~revoked)
    elif status == "redeemed":
        query = query.where(~unredeemed)
    elif status == "expired":
        query = query.where(unredeemed, ~live, ~revoked)
    elif status == "revoked":
        query = query.where(unredeemed, revoked)
    return query


def code_status(code, now=None):
    """'redeemed', 'revoked', 'expired' or 'unused'."""
    if code.redeemed_at is not None or code.redeemed_by_id is not None:
        return "redeemed"
    if code.revoked_at is not None:
        return "revoked"
    if code.expires_at is not None and code.expires_at <= (now or utcnow()):
        return "expired"
    return "unused"


def _emails(user_ids):
    ids = {i for i in user_ids if i}
    if not ids:
        return {}
    return dict(db.session.execute(db.select(User.id, User.email).where(User.id.in_(ids))).all())


def _codes_page(form, status=200):
    # The batch made by the last POST is shown in full on exactly one page view.
    new_batch = session.pop(NEW_CODE_BATCH, None)
    new_codes = db.session.scalars(
        db.select(RedemptionCode.code).filter_by(batch=new_batch).order_by(RedemptionCode.id)
    ).all() if new_batch else None
    status_filter = request.args.get("status", "all")
    if status_filter not in CODE_STATUSES:
        status_filter = "all"
    batch = request.args.get("batch", "").strip()
    page = paginate(_codes_query(status_filter, batch), request.args.get("page", 1, type=int))
    batches = db.session.execute(
        db.select(RedemptionCode.batch, func.count(RedemptionCode.id),
                  func.max(RedemptionCode.created_at))
        .where(RedemptionCode.batch.is_not(None)).group_by(RedemptionCode.batch)
        .order_by(func.max(RedemptionCode.created_at).desc()).limit(20)).all()
    return render_template(
        "admin/codes.html", form=form, page=page, status_filter=status_filter, batch=batch,
        statuses=CODE_STATUSES, batches=batches, new_codes=new_codes, new_batch=new_batch,
        emails=_emails(c.redeemed_by_id for c in page.items), code_status=code_status,
        now=utcnow()), status


@bp.route("/codes", methods=["GET", "POST"])
@admin_required
def codes():
    """Generate a batch of redemption codes; list codes by status and batch."""
    form = CodesForm()
    if form.validate_on_submit():
        expires_at = (utcnow() + timedelta(days=form.expires_days.data)
                      if form.expires_days.data else None)
        new_codes = create_codes(form.amount.micro, form.count.data, expires_at=expires_at,
                                 created_by_id=current_user.id)
        # Post/redirect/get, so a reload cannot mint a second batch. The session holds
        # only the batch id: a thousand codes would not fit in a cookie.
        session[NEW_CODE_BATCH] = db.session.scalar(
            db.select(RedemptionCode.batch).filter_by(code=new_codes[0]))
        flash(f"Created {len(new_codes)} code{'s' if len(new_codes) != 1 else ''} worth "
              f"{format_credits(form.amount.micro)} credits each.", "ok")
        return redirect(url_for(".codes", _anchor="new-codes"))
    return _codes_page(form, status=400 if form.is_submitted() else 200)


@bp.post("/codes/<int:code_id>/revoke")
@admin_required
def code_revoke(code_id):
    """Revoke an unused code. It also expires now, which redeeming already refuses, so a
    revoked code can never be redeemed, even by a request racing this one."""
    now = utcnow()
    revoked = db.session.execute(
        db.update(RedemptionCode).where(RedemptionCode.id == code_id,
                                        RedemptionCode.redeemed_at.is_(None),
                                        RedemptionCode.revoked_at.is_(None))
        .values(revoked_at=now, expires_at=now)).rowcount
    db.session.commit()
    code = db.get_or_404(RedemptionCode, code_id)
    if revoked:
        flash(f"Code {code.code[:8]}… is revoked; it can no longer be redeemed.", "ok")
    else:
        flash(f"Code {code.code[:8]}… was not revoked: it is already {code_status(code, now)}.",
              "error")
    return redirect(request.referrer if _from_codes_page() else url_for(".codes"))


def _from_codes_page():
    """True when the Referer is this admin's own codes page (so the filter is kept)."""
    ref = request.referrer or ""
    return ref.startswith(request.host_url.rstrip("/") + url_for(".codes"))


@bp.get("/codes.csv")
@admin_required
def codes_csv():
    """CSV of one batch (`?batch=`) or of codes by `?status=` (unused by default)."""
    batch = request.args.get("batch", "").strip()
    status = request.args.get("status") or ("all" if batch else "unused")
    if status not in CODE_STATUSES:
        status = "unused"
    query = _codes_query(status, batch).execution_options(yield_per=500)

    def rows():
        now = utcnow()
        for chunk in db.session.scalars(query).partitions(500):
            emails = _emails(c.redeemed_by_id for c in chunk)
            for c in chunk:
                yield [c.code, Decimal(format_credits(c.amount_micro)), c.batch or "",
                       code_status(c, now), _iso(c.created_at), _iso(c.expires_at),
                       emails.get(c.redeemed_by_id, ""), _iso(c.redeemed_at)]

    name = f"codes-{batch}.csv" if batch else f"codes-{status}.csv"
    header = ["code", "credits", "batch", "status", "created_at", "expires_at", "redeemed_by",
              "redeemed_at"]
    return Response(stream_with_context(csv_chunks(header, rows())), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _iso(value):
    return value.isoformat(sep=" ", timespec="seconds") if value else ""


# --- settings ----------------------------------------------------------------------------

def current_settings():
    """The admin-editable settings: the stored value, else the configured default."""
    config = current_app.config
    return {
        "registration": Setting.get("registration", config["REGISTRATION"]),
        "signup_bonus_micro": int(Setting.get("signup_bonus_micro", "0") or 0),
        "default_output_cap": int(Setting.get("default_output_cap",
                                              str(config["DEFAULT_OUTPUT_CAP"]))),
    }


def environment_facts():
    """Read-only facts from the environment; never a secret or a URL with credentials."""
    config = current_app.config
    return [
        ("Public URL (TOKENOPEN_PUBLIC_URL)", config.get("PUBLIC_URL") or
         f"not set — snippets use the request host ({request.host_url.rstrip('/')})"),
        ("Redis (TOKENOPEN_REDIS_URL)", "on — limits and health shared by all workers"
         if config.get("REDIS_URL") else "off — in-memory, one worker"),
        ("Database (TOKENOPEN_DATABASE_URL)", db.engine.dialect.name),
        ("Registration default (TOKENOPEN_REGISTRATION)", config.get("REGISTRATION")),
        ("Upstream timeout (TOKENOPEN_UPSTREAM_TIMEOUT)", f"{config.get('UPSTREAM_TIMEOUT')} s"),
        ("Channel cool-down", f"after {config.get('CHANNEL_FAILURES_BEFORE_COOLDOWN')} failures "
                              f"in a row, for {config.get('CHANNEL_COOLDOWN_SECONDS')} s"),
        ("Cache TTL (TOKENOPEN_CACHE_TTL)", f"{config.get('CACHE_TTL')} s"),
    ]


@bp.route("/settings", methods=["GET", "POST"])
@admin_required
def settings():
    """Registration mode, signup bonus and the default output cap."""
    values = current_settings()
    form = SettingsForm(data={"registration": values["registration"],
                              "signup_bonus": format_credits(values["signup_bonus_micro"]),
                              "default_output_cap": values["default_output_cap"]})
    if form.validate_on_submit():
        Setting.put("registration", form.registration.data)
        Setting.put("signup_bonus_micro", str(form.signup_bonus.micro))
        Setting.put("default_output_cap", str(form.default_output_cap.data))
        db.session.commit()
        flash("Settings saved.", "ok")
        return redirect(url_for(".settings"))
    status = 400 if form.is_submitted() else 200
    return render_template("admin/settings.html", form=form, facts=environment_facts()), status
