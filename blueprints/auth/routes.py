"""Console pages: register, log in, log out, change password."""
from urllib.parse import urlsplit

from flask import (Blueprint, current_app, flash, g, redirect, render_template, request,
                   url_for)
from flask_limiter.util import get_remote_address
from flask_login import current_user, login_required, login_user, logout_user

from blueprints.auth.forms import ChangePasswordForm, LoginForm, LogoutForm, RegisterForm
from blueprints.auth.signup import SignupError, register_member, registration_mode
from extensions import db, limiter
from models import User

bp = Blueprint("auth", __name__)

TOO_MANY_SIGNUPS = ("Too many registrations from your network. Wait a while, then try again "
                    "(or ask an admin to create your account).")
TOO_MANY_LOGINS = ("Too many failed login attempts. Wait a minute, then try again "
                   "(or ask an admin to reset your password).")


def _login_limit():
    return current_app.config["LOGIN_LIMIT"]


def _login_account():
    """The per-account limit key: the email being tried ('' skips the limit)."""
    email = (request.form.get("email") or "").strip().lower()
    return f"account:{email}" if email else ""


def _failed_login(response):
    """Only failed attempts count, so a team behind one NAT can still log in all day."""
    return bool(g.get("login_failed"))


def safe_next(target):
    """`target` if it is a path on this site, else None (no open redirects, no header
    injection): control characters go too, as browsers drop tabs and newlines from a URL,
    turning "/\t/evil.example" into "//evil.example"."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in target):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _home():
    return url_for("dashboard.overview")


@bp.app_context_processor
def _registration_links():
    """Templates call registration_mode() (lazily, guests only) to hide a closed Register link."""
    return {"registration_mode": registration_mode}


def _register_limit():
    return current_app.config["REGISTER_LIMIT"]


@bp.route("/register", methods=["GET", "POST"])
@limiter.limit(_register_limit, methods=["POST"], scope="register-ip",
               key_func=get_remote_address, error_message=TOO_MANY_SIGNUPS)
def register():
    """Create an account (open, invite-only or closed, per the registration mode)."""
    if current_user.is_authenticated:
        return redirect(_home())
    mode = registration_mode()
    form = RegisterForm()
    if mode == "closed":
        status = 403 if request.method == "POST" else 200
        return render_template("auth/register.html", form=form, mode=mode), status
    if form.validate_on_submit():
        try:
            user = register_member(form.email.data, form.password.data, form.code.data)
        except SignupError as err:
            target = getattr(form, err.field).errors if err.field else form.form_errors
            target.append(str(err))
        else:
            login_user(user)
            flash("Welcome to TokenOpen. Create an API key to get started.", "ok")
            return redirect(_home())
    return render_template("auth/register.html", form=form, mode=mode)


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(_login_limit, methods=["POST"], scope="login-ip", key_func=get_remote_address,
               deduct_when=_failed_login, error_message=TOO_MANY_LOGINS)
@limiter.limit(_login_limit, methods=["POST"], scope="login-account", key_func=_login_account,
               deduct_when=_failed_login, error_message=TOO_MANY_LOGINS)
def login():
    """Log in with email and password; failed attempts are limited per IP and per account."""
    if current_user.is_authenticated:
        return redirect(safe_next(request.args.get("next")) or _home())
    form = LoginForm()
    if form.validate_on_submit():
        user = User.authenticate(form.email.data.strip().lower(), form.password.data)
        if user is None:
            form.form_errors.append("Wrong email or password.")
        elif user.disabled:
            form.form_errors.append("This account is disabled. Ask an admin to enable it.")
        else:
            login_user(user, remember=form.remember.data)
            return redirect(safe_next(request.args.get("next")) or _home())
    if request.method == "POST":
        g.login_failed = True
    return render_template("auth/login.html", form=form, mode=registration_mode())


@bp.route("/logout", methods=["GET", "POST"])
def logout():
    """POST logs out; GET shows a one-button confirmation (links must not log people out)."""
    form = LogoutForm()
    if not current_user.is_authenticated:
        return redirect(url_for("auth.login"))
    if form.validate_on_submit():
        # A new token kills every copy of this user's session and remember-me cookies
        # (Flask-Login stores the token, and the cookies themselves live in the browser).
        current_user.rotate_session_token()
        db.session.commit()
        logout_user()
        flash("You are logged out. Your other devices are signed out too.", "ok")
        return redirect(url_for("auth.login"))
    return render_template("auth/logout.html", form=form)


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
def change_password():
    """Change the logged-in user's password after checking the current one."""
    form = ChangePasswordForm()
    if form.validate_on_submit():
        if not current_user.check_password(form.current.data):
            form.current.errors.append("That is not your current password.")
        else:
            current_user.set_password(form.password.data)
            db.session.commit()
            login_user(current_user)  # this session carries on; every other one is signed out
            flash("Your password has been changed; other sessions are signed out.", "ok")
            return redirect(url_for("auth.change_password"))
    return render_template("auth/password.html", form=form)
