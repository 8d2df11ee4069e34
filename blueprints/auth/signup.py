"""Who may register, and creating a member account (invite code and signup bonus included)."""
from flask import current_app
from sqlalchemy.exc import IntegrityError

from billing import grant_credits, redeem_code
from bootstrap import create_user
from extensions import db
from models import RedemptionCode, Setting, User, utcnow

MODES = ("open", "invite", "closed")
# Worded not to confirm that the address has an account (the register form is rate-limited).
EMAIL_REFUSED = ("An account cannot be created with this email address. If you have one "
                 "already, log in (an admin can reset a forgotten password).")


class SignupError(ValueError):
    """A registration refused for a reason the person can fix; `field` names the form field."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


def registration_mode():
    """'open', 'invite' or 'closed': the admin's setting, else TOKENOPEN_REGISTRATION."""
    mode = (Setting.get("registration") or current_app.config["REGISTRATION"] or "open")
    mode = mode.strip().lower()
    return mode if mode in MODES else "closed"  # an unknown value must not open the doors


def signup_bonus_micro():
    """Credits every new member starts with (Setting 'signup_bonus_micro', default 0)."""
    try:
        return max(int(Setting.get("signup_bonus_micro") or 0), 0)
    except ValueError:
        return 0


def _check_invite(code):
    """Refuse an unknown, used or expired code before any user row exists."""
    row = db.session.scalar(db.select(RedemptionCode).filter_by(code=code))
    if row is None or row.redeemed_at is not None:
        raise SignupError("This invite code is unknown or has already been used.", "code")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise SignupError("This invite code has expired.", "code")


def _email_taken(email):
    return db.session.scalar(db.select(User.id).filter_by(email=email)) is not None


def register_member(email, password, code=None):
    """Create a member in the default group per the registration mode; returns the User.

    Raises SignupError with a message for the person. In invite mode the code is checked
    first and redeemed in the same transaction as the new user, so a bad code leaves no user.
    """
    mode = registration_mode()
    if mode == "closed":
        raise SignupError("Registration is closed on this gateway. Ask an admin for an account.")
    email = (email or "").strip().lower()
    code = (code or "").strip().lower()  # codes are stored lowercase (billing.redeem_code)
    if mode == "invite":  # before the e-mail check: no probing addresses without a code
        if not code:
            raise SignupError("An invite code is required to register here.", "code")
        _check_invite(code)
    if _email_taken(email):
        raise SignupError(EMAIL_REFUSED, "email")
    try:
        user = create_user(email, password)
    except ValueError as err:
        db.session.rollback()
        raise SignupError(str(err)) from None
    except IntegrityError:  # another request registered the same email a moment ago
        db.session.rollback()
        raise SignupError(EMAIL_REFUSED, "email") from None
    try:
        if mode == "invite":
            redeem_code(user.id, code)  # commits the user and the redemption together
        db.session.commit()
    except ValueError as err:  # the code was taken by someone else meanwhile
        db.session.rollback()
        _forget(email)
        raise SignupError(str(err) or "This invite code cannot be used.", "code") from None
    except IntegrityError:  # another request registered the same email a moment ago
        db.session.rollback()
        raise SignupError(EMAIL_REFUSED, "email") from None
    bonus = signup_bonus_micro()
    if bonus:
        grant_credits(user.id, bonus, kind="grant", note="signup bonus")
    return user


def _forget(email):
    """Delete a user row a failed redemption may have committed, so nothing is left behind."""
    user = db.session.scalar(db.select(User).filter_by(email=email))
    if user is not None and user.balance_micro == 0:
        db.session.delete(user)
        db.session.commit()
