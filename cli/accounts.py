"""users, keys and groups commands."""
from datetime import timedelta

import click
from sqlalchemy import func

from bootstrap import DEFAULT_GROUP, create_user
from cli.common import (
    credits_or_fail, echo_json, fail, group_or_fail, iso, password_or_fail, user_or_fail,
)
from extensions import db
from models import (ALL_MODELS, MAX_EXPIRY_DAYS, MAX_RPM, MAX_TPM, ApiKey, Group, User, split_list,
                    utcnow)
from money import format_credits, parse_ratio_ppm

KEY_NAME_MAX = 100  # ApiKey.name column size
GROUP_NAME_MAX = 64  # Group.name column size


def user_summary(user):
    """What `users show --json` prints for `user`."""
    keys = db.session.scalar(db.select(func.count(ApiKey.id)).filter_by(user_id=user.id))
    return {
        "email": user.email,
        "group": user.group.name,
        "balance_micro": user.balance_micro,
        "balance": format_credits(user.balance_micro),
        "reserved_micro": user.reserved_micro,
        "is_admin": user.is_admin,
        "disabled": user.disabled,
        "created_at": iso(user.created_at),
        "keys": keys,
    }


def key_status(key):
    """'disabled', 'expired' or 'active'."""
    if key.disabled:
        return "disabled"
    return "expired" if key.is_expired() else "active"


def key_summary(key):
    """What `keys list --json` prints for one key: never the full key."""
    limit = key.credit_limit_micro
    return {
        "name": key.name,
        "key": key.display,
        "status": key_status(key),
        "created_at": iso(key.created_at),
        "last_used_at": iso(key.last_used_at),
        "expires_at": iso(key.expires_at),
        "models": key.model_list,
        "allowed_ips": key.ip_list,
        "credit_limit": None if limit is None else format_credits(limit),
        "spent": format_credits(key.spent_micro),
        "rpm": key.rpm,
        "tpm": key.tpm,
        "concurrency": key.concurrency,
    }


def group_summary(group):
    """What `groups list --json` prints for one group."""
    members = db.session.scalar(db.select(func.count(User.id)).filter_by(group_id=group.id))
    return {
        "name": group.name,
        "models": group.models,
        "rpm": group.rpm,
        "tpm": group.tpm,
        "concurrency": group.concurrency,
        "multiplier": format_credits(group.multiplier_ppm),
        "multiplier_ppm": group.multiplier_ppm,
        "members": members,
    }


def key_or_fail(user, name):
    """The key of `user` called `name`; a clean failure when none or several match."""
    keys = db.session.scalars(db.select(ApiKey).filter_by(user_id=user.id, name=name)).all()
    if not keys:
        fail(f"{user.email} has no key named {name!r}")
    if len(keys) > 1:
        fail(f"{user.email} has {len(keys)} keys named {name!r}; manage them in the console")
    return keys[0]


def parse_cidrs(text):
    """'10.0.0.0/8, 1.2.3.4' -> '10.0.0.0/8,1.2.3.4/32' (the console's rule), or a clean failure."""
    from blueprints.keys.forms import parse_networks  # here: WTForms would slow every command
    try:
        return ",".join(parse_networks(text)) or None
    except ValueError as err:
        fail(str(err))


def parse_group_models(text):
    """'*' or 'a, b' -> the stored form; an empty list is refused (use '*' for all)."""
    if text.strip() == ALL_MODELS:
        return ALL_MODELS
    models = split_list(text)
    if not models:
        fail("--models needs model names or '*' for all models")
    return ",".join(models)


def register(app):
    """Attach the users, keys and groups command groups."""

    @app.cli.group("users")
    def users():
        """Create and manage accounts."""

    @users.command("create")
    @click.argument("email")
    @click.option("--password", required=True, help="At least 8 characters.")
    @click.option("--admin", is_flag=True, help="Give the user the admin console.")
    @click.option("--group", "group_name", help="Group to join (default: 'default').")
    def users_create(email, password, admin, group_name):
        """Create a user."""
        try:
            user = create_user(email, password, is_admin=admin, group_name=group_name)
        except ValueError as err:
            fail(str(err))
        db.session.commit()
        role = "admin" if admin else "user"
        click.echo(f"created {role} {user.email} in group {user.group.name}")

    @users.command("show")
    @click.argument("email")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def users_show(email, as_json):
        """Show a user's group, balance, flags and key count."""
        info = user_summary(user_or_fail(email))
        if as_json:
            echo_json(info)
            return
        flags = [flag for flag, on in (("admin", info["is_admin"]),
                                       ("disabled", info["disabled"])) if on]
        click.echo(f"{info['email']}  group={info['group']}  balance={info['balance']}"
                   f"  reserved={format_credits(info['reserved_micro'])}  keys={info['keys']}"
                   f"  created={info['created_at']}" + "".join(f"  {f}" for f in flags))

    @users.command("disable")
    @click.argument("email")
    def users_disable(email):
        """Block a user from the console and the API (their keys stop working)."""
        user = user_or_fail(email)
        user.disabled = True
        db.session.commit()
        click.echo(f"disabled {user.email}")

    @users.command("enable")
    @click.argument("email")
    def users_enable(email):
        """Let a disabled user back in."""
        user = user_or_fail(email)
        user.disabled = False
        db.session.commit()
        click.echo(f"enabled {user.email}")

    @users.command("set-group")
    @click.argument("email")
    @click.argument("group_name", metavar="GROUP")
    def users_set_group(email, group_name):
        """Move a user to another group."""
        user = user_or_fail(email)
        user.group_id = group_or_fail(group_name).id
        db.session.commit()
        click.echo(f"{user.email} is now in group {group_name}")

    @users.command("set-password")
    @click.argument("email")
    @click.option("--password", required=True, help="At least 8 characters.")
    def users_set_password(email, password):
        """Set a user's password (e.g. a forgotten admin password)."""
        user = user_or_fail(email)
        user.set_password(password_or_fail(password))
        db.session.commit()
        click.echo(f"password changed for {user.email}")

    @users.command("set-admin")
    @click.argument("email")
    def users_set_admin(email):
        """Give a user the admin console."""
        user = user_or_fail(email)
        user.is_admin = True
        db.session.commit()
        click.echo(f"{user.email} is an admin")

    @users.command("unset-admin")
    @click.argument("email")
    def users_unset_admin(email):
        """Take admin rights away (the last admin keeps them)."""
        user = user_or_fail(email)
        admins = db.session.scalar(db.select(func.count(User.id)).filter_by(is_admin=True))
        if user.is_admin and admins <= 1:
            fail(f"{user.email} is the last admin; make someone else an admin first")
        user.is_admin = False
        db.session.commit()
        click.echo(f"{user.email} is no longer an admin")

    @app.cli.group("keys")
    def keys():
        """Create and manage a user's sk- API keys."""

    @keys.command("create")
    @click.argument("email")
    @click.option("--name", required=True, help="A label, unique among the user's keys.")
    @click.option("--models",
                  help="Comma-separated models this key may use (default: the group's).")
    @click.option("--credit-limit", help="Credits this key may spend in total.")
    @click.option("--expires-days", type=click.IntRange(1, MAX_EXPIRY_DAYS),
                  help="Expire after N days.")
    @click.option("--ips", help="Comma-separated IPs or CIDR ranges allowed to use the key.")
    @click.option("--rpm", type=click.IntRange(0, MAX_RPM), default=0, show_default=True,
                  help="Requests per minute for this key (0 = only the group limit).")
    @click.option("--tpm", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Tokens per minute for this key (0 = only the group limit).")
    @click.option("--concurrency", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Requests in flight at once for this key (0 = only the group limit).")
    def keys_create(email, name, models, credit_limit, expires_days, ips, rpm, tpm, concurrency):
        """Create a key and print it (only the sk- key, shown this once)."""
        user = user_or_fail(email)
        name = name.strip()
        if not name or len(name) > KEY_NAME_MAX:
            fail(f"--name must be 1 to {KEY_NAME_MAX} characters")
        if db.session.scalar(db.select(ApiKey.id).filter_by(user_id=user.id, name=name)):
            fail(f"{user.email} already has a key named {name!r}")
        fields = {
            "models": ",".join(split_list(models)) or None,
            "allowed_ips": parse_cidrs(ips),
            "credit_limit_micro": None if credit_limit is None else credits_or_fail(credit_limit),
            "expires_at": utcnow() + timedelta(days=expires_days) if expires_days else None,
            "rpm": rpm,
            "tpm": tpm,
            "concurrency": concurrency,
        }
        key, full_key = ApiKey.generate(user, name, **fields)
        db.session.add(key)
        db.session.commit()
        click.echo(full_key)

    @keys.command("set")
    @click.argument("email")
    @click.argument("name")
    @click.option("--models", help="Comma-separated models ('' = whatever the group allows).")
    @click.option("--rpm", type=click.IntRange(min=0), help="Requests per minute (0 = none).")
    @click.option("--tpm", type=click.IntRange(min=0), help="Tokens per minute (0 = none).")
    @click.option("--concurrency", type=click.IntRange(min=0),
                  help="Requests in flight at once (0 = none).")
    def keys_set(email, name, models, rpm, tpm, concurrency):
        """Change only the given options of a key."""
        key = key_or_fail(user_or_fail(email), name)
        if models is not None:
            key.models = ",".join(split_list(models)) or None
        for field, value in (("rpm", rpm), ("tpm", tpm), ("concurrency", concurrency)):
            if value is not None:
                setattr(key, field, value)
        db.session.commit()
        info = key_summary(key)
        click.echo(f"updated key {name!r} of {key.user.email}: rpm={info['rpm']}"
                   f"  tpm={info['tpm']}  concurrency={info['concurrency']}")

    @keys.command("list")
    @click.argument("email")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def keys_list(email, as_json):
        """List a user's keys (prefix and last 4 only)."""
        user = user_or_fail(email)
        rows = db.session.scalars(db.select(ApiKey).filter_by(user_id=user.id)
                                  .order_by(ApiKey.created_at, ApiKey.id)).all()
        summaries = [key_summary(key) for key in rows]
        if as_json:
            echo_json(summaries)
            return
        if not summaries:
            click.echo(f"{user.email} has no keys")
        for info in summaries:
            limit = info["credit_limit"] or "none"
            click.echo(f"{info['name']}  {info['key']}  {info['status']}"
                       f"  spent={info['spent']}  limit={limit}"
                       f"  expires={info['expires_at'] or 'never'}"
                       f"  last_used={info['last_used_at'] or 'never'}")

    def set_key_disabled(email, name, disabled):
        key = key_or_fail(user_or_fail(email), name)
        key.disabled = disabled
        db.session.commit()
        click.echo(f"{'disabled' if disabled else 'enabled'} key {name!r} of {key.user.email}")

    @keys.command("disable")
    @click.argument("email")
    @click.argument("name")
    def keys_disable(email, name):
        """Stop a key from working (it can be enabled again)."""
        set_key_disabled(email, name, True)

    @keys.command("enable")
    @click.argument("email")
    @click.argument("name")
    def keys_enable(email, name):
        """Let a disabled key work again."""
        set_key_disabled(email, name, False)

    @keys.command("delete")
    @click.argument("email")
    @click.argument("name")
    def keys_delete(email, name):
        """Delete a key for good (its logs stay)."""
        user = user_or_fail(email)
        db.session.delete(key_or_fail(user, name))
        db.session.commit()
        click.echo(f"deleted key {name!r} of {user.email}")

    @app.cli.group("groups")
    def groups():
        """Model access, rate limits and price multipliers shared by members."""

    @groups.command("set")
    @click.argument("name")
    @click.option("--models", help="Comma-separated models, or '*' for all.")
    @click.option("--rpm", type=click.IntRange(0, MAX_RPM),
                  help="Requests per minute per user (0 = unlimited).")
    @click.option("--tpm", type=click.IntRange(0, MAX_TPM),
                  help="Tokens per minute per user (0 = unlimited).")
    @click.option("--concurrency", type=click.IntRange(min=0),
                  help="Requests in flight at once per user (0 = unlimited).")
    @click.option("--multiplier", help="Price multiplier, e.g. 1, 0.8 or 1.25.")
    def groups_set(name, models, rpm, tpm, concurrency, multiplier):
        """Create a group or change the given settings of an existing one."""
        name = name.strip()
        if not name or len(name) > GROUP_NAME_MAX:
            fail(f"a group name must be 1 to {GROUP_NAME_MAX} characters")
        changes = {}
        if models is not None:
            changes["models"] = parse_group_models(models)
        if rpm is not None:
            changes["rpm"] = rpm
        if tpm is not None:
            changes["tpm"] = tpm
        if concurrency is not None:
            changes["concurrency"] = concurrency
        if multiplier is not None:
            try:
                changes["multiplier_ppm"] = parse_ratio_ppm(multiplier)
            except ValueError as err:
                raise click.BadParameter(f"bad --multiplier: {err}") from None
        group = db.session.scalar(db.select(Group).filter_by(name=name))
        created = group is None
        if created:
            group = Group(name=name, models=ALL_MODELS, rpm=60, tpm=0, concurrency=0,
                          multiplier_ppm=1_000_000)
            db.session.add(group)
        for field, value in changes.items():
            setattr(group, field, value)
        db.session.commit()
        info = group_summary(group)
        click.echo(f"{'created' if created else 'updated'} group {name}: models={info['models']}"
                   f"  rpm={info['rpm']}  tpm={info['tpm']}  concurrency={info['concurrency']}"
                   f"  multiplier={info['multiplier']}")

    @groups.command("delete")
    @click.argument("name")
    def groups_delete(name):
        """Delete an empty group (never the default one)."""
        group = group_or_fail(name)
        if group.name == DEFAULT_GROUP:
            fail(f"group {DEFAULT_GROUP} is where new users join; it cannot be deleted")
        members = db.session.scalar(db.select(func.count(User.id)).filter_by(group_id=group.id))
        if members:
            fail(f"group {name} still has {members} member(s); move them first (users set-group)")
        db.session.delete(group)
        db.session.commit()
        click.echo(f"deleted group {name}")

    @groups.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def groups_list(as_json):
        """List groups with their limits and member counts."""
        summaries = [group_summary(g) for g in db.session.scalars(
            db.select(Group).order_by(Group.name)).all()]
        if as_json:
            echo_json(summaries)
            return
        for info in summaries:
            click.echo(f"{info['name']}  models={info['models']}  rpm={info['rpm']}"
                       f"  tpm={info['tpm']}  multiplier={info['multiplier']}"
                       f"  members={info['members']}")
