"""Console pages: the member's API keys (list, create, edit, disable, enable, delete)."""
from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from blueprints.keys.forms import CreateKeyForm, EditKeyForm
from blueprints.dashboard.queries import quickstart_model
from blueprints.queries import get_owned_or_404
from extensions import db
from models import ApiKey, utcnow

bp = Blueprint("keys", __name__)

def _own_keys():
    return db.session.scalars(db.select(ApiKey).filter_by(user_id=current_user.id)
                              .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())).all()


def _render(form, status=200, new_key=None):
    base_url = (current_app.config.get("PUBLIC_URL") or request.host_url).rstrip("/")
    return render_template("keys/index.html", keys=_own_keys(), form=form, new_key=new_key,
                           now=utcnow(), api_base=base_url + "/v1",
                           model=quickstart_model(current_user)), status


@bp.get("/keys")
@login_required
def index():
    """The current user's keys and the create form."""
    return _render(CreateKeyForm())


@bp.post("/keys")
@login_required
def create():
    """Create a key and show it once, in this response only: it is never stored anywhere,
    not even in the session cookie. The page swaps its URL for /keys, so a reload is a GET
    that shows only the prefix (and creates nothing)."""
    form = CreateKeyForm()
    if not form.validate_on_submit():
        return _render(form, 400)
    key, full_key = ApiKey.generate(current_user, form.name.data.strip(), **form.key_fields())
    db.session.add(key)
    db.session.commit()
    return _render(CreateKeyForm(formdata=None), 201,
                   new_key={"id": key.id, "name": key.name, "key": full_key})


@bp.route("/keys/<int:key_id>/edit", methods=["GET", "POST"])
@login_required
def edit(key_id):
    """Rename a key or change its expiry, credit limit, rate limit, models and IP ranges."""
    key = get_owned_or_404(ApiKey, key_id, current_user)
    form = EditKeyForm() if request.method == "POST" else EditKeyForm.for_key(key)
    if form.validate_on_submit():
        key.name = form.name.data.strip()
        for column, value in form.key_fields().items():
            setattr(key, column, value)
        db.session.commit()
        flash(f"Key “{key.name}” is saved.", "ok")
        if key.user_id != current_user.id:  # an admin editing a member's key
            return redirect(url_for("admin.user_detail", user_id=key.user_id, _anchor="keys"))
        return redirect(url_for("keys.index"))
    status = 400 if form.is_submitted() else 200
    return render_template("keys/edit.html", form=form, key=key, now=utcnow()), status


def _set_disabled(key_id, disabled):
    key = get_owned_or_404(ApiKey, key_id, current_user)
    key.disabled = disabled
    db.session.commit()
    flash(f"Key “{key.name}” is {'disabled' if disabled else 'enabled'}.", "ok")
    return redirect(url_for("keys.index"))


@bp.post("/keys/<int:key_id>/disable")
@login_required
def disable(key_id):
    """Stop a key from working until it is enabled again."""
    return _set_disabled(key_id, True)


@bp.post("/keys/<int:key_id>/enable")
@login_required
def enable(key_id):
    """Let a disabled key work again."""
    return _set_disabled(key_id, False)


@bp.post("/keys/<int:key_id>/delete")
@login_required
def delete(key_id):
    """Delete a key for good; its request logs keep the key's name."""
    key = get_owned_or_404(ApiKey, key_id, current_user)
    name = key.name
    db.session.delete(key)
    db.session.commit()
    flash(f"Key “{name}” is deleted.", "ok")
    return redirect(url_for("keys.index"))
