"""Who may open what: the admin guard used by every /admin page."""
from functools import wraps

from flask import abort
from flask_login import current_user, login_required


def admin_required(view):
    """Logged-in admins only; members get 403, anonymous visitors the login page."""
    @wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if not current_user.is_admin:
            abort(403)
        return view(*args, **kwargs)
    return wrapped
