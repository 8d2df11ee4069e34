"""The admin CLI (cli/accounts.py, cli/channels.py, cli/setup.py) on SQLite and PostgreSQL."""
import json
import os
import re
import subprocess
from datetime import timedelta

import pytest

from extensions import db
from models import ApiKey, Channel, ChannelModel, Group, User, utcnow
from tests.support import PYTHON, ROOT, postgres_database_url

SNAPSHOT_MODELS = (User, Group, ApiKey, Channel, ChannelModel)


def snapshot(app):
    """Every row of the tables the CLI touches, to prove a failed command changed nothing."""
    with app.app_context():
        rows = {}
        for model in SNAPSHOT_MODELS:
            columns = model.__table__.columns
            rows[model.__tablename__] = sorted(
                tuple(str(getattr(r, c.key)) for c in columns)
                for r in db.session.scalars(db.select(model)))
        return rows


def invoke_fails(app, runner, args, message):
    """Run a command that must fail: non-zero exit, `message` on stderr, database unchanged."""
    before = snapshot(app)
    result = runner.invoke(args=args)
    assert result.exit_code != 0, result.output
    assert message in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert snapshot(app) == before
    return result


def ok(runner, args):
    result = runner.invoke(args=args)
    assert result.exit_code == 0, result.output
    return result


def get(app, model, **filters):
    with app.app_context():
        return db.session.scalar(db.select(model).filter_by(**filters))


# --- users --------------------------------------------------------------------------------

def test_users_create_and_show(app, runner):
    result = ok(runner, ["users", "create", "Ann@Example.com", "--password", "password123"])
    assert "ann@example.com" in result.stdout
    ok(runner, ["groups", "set", "vip"])
    ok(runner, ["users", "create", "boss@example.com", "--password", "password123",
                "--admin", "--group", "vip"])

    info = json.loads(ok(runner, ["users", "show", "ann@example.com", "--json"]).stdout)
    assert info == {**info, "email": "ann@example.com", "group": "default", "balance_micro": 0,
                    "balance": "0", "reserved_micro": 0, "is_admin": False, "disabled": False,
                    "keys": 0}
    assert info["created_at"]
    boss = json.loads(ok(runner, ["users", "show", "BOSS@example.com", "--json"]).stdout)
    assert boss["is_admin"] is True and boss["group"] == "vip"
    assert get(app, User, email="boss@example.com").check_password("password123")

    line = ok(runner, ["users", "show", "boss@example.com"]).stdout
    assert "boss@example.com" in line and "group=vip" in line and "admin" in line


def test_users_show_reports_balance_and_keys(app, runner, factory):
    factory.user("rich@example.com", balance_micro=1_500_001)
    factory.key("rich@example.com", name="one")
    factory.key("rich@example.com", name="two")
    info = json.loads(ok(runner, ["users", "show", "rich@example.com", "--json"]).stdout)
    assert info["balance_micro"] == 1_500_001
    assert info["balance"] == "1.500001"
    assert info["keys"] == 2
    assert "balance=1.500001" in ok(runner, ["users", "show", "rich@example.com"]).stdout


@pytest.mark.parametrize("args, message", [
    (["users", "create", "ann@example.com", "--password", "short"], "at least 8 characters"),
    (["users", "create", "not-an-email", "--password", "password123"], "not an email"),
    (["users", "create", "new@example.com", "--password", "password123", "--group", "nope"],
     "no such group: nope"),
    (["users", "create", "ANN@example.com", "--password", "password123"], "already exists"),
    (["users", "show", "ghost@example.com", "--json"], "no user with email ghost@example.com"),
    (["users", "disable", "ghost@example.com"], "no user with email"),
    (["users", "enable", "ghost@example.com"], "no user with email"),
    (["users", "set-group", "ghost@example.com", "default"], "no user with email"),
    (["users", "set-group", "ann@example.com", "nope"], "no group named nope"),
    (["users", "set-password", "ghost@example.com", "--password", "password123"], "no user"),
    (["users", "set-password", "ann@example.com", "--password", "short"], "at least 8"),
    (["users", "set-admin", "ghost@example.com"], "no user with email"),
    (["users", "unset-admin", "ghost@example.com"], "no user with email"),
    (["users", "unset-admin", "boss@example.com"], "boss@example.com is the last admin"),
])
def test_users_errors(app, runner, factory, args, message):
    factory.user("ann@example.com")
    factory.user("boss@example.com", is_admin=True)
    invoke_fails(app, runner, args, message)


def test_users_create_needs_a_password(app, runner):
    invoke_fails(app, runner, ["users", "create", "ann@example.com"], "--password")


def test_users_disable_enable_set_group_set_password(app, runner, factory):
    factory.user("ann@example.com")
    assert "disabled" in ok(runner, ["users", "disable", "ann@example.com"]).stdout
    assert get(app, User, email="ann@example.com").disabled is True
    ok(runner, ["users", "disable", "ann@example.com"])  # idempotent
    assert json.loads(ok(runner, ["users", "show", "ann@example.com", "--json"]).stdout)["disabled"]
    ok(runner, ["users", "enable", "ann@example.com"])
    assert get(app, User, email="ann@example.com").disabled is False

    ok(runner, ["groups", "set", "team"])
    assert "team" in ok(runner, ["users", "set-group", "ann@example.com", "team"]).stdout
    assert get(app, User, email="ann@example.com").group.name == "team"

    ok(runner, ["users", "set-password", "ann@example.com", "--password", "new-password-9"])
    user = get(app, User, email="ann@example.com")
    assert user.check_password("new-password-9") and not user.check_password("password123")


def test_users_set_admin_and_unset_admin(app, runner, factory):
    factory.user("boss@example.com", is_admin=True)
    factory.user("ann@example.com")
    assert "is an admin" in ok(runner, ["users", "set-admin", "ann@example.com"]).stdout
    assert get(app, User, email="ann@example.com").is_admin is True
    ok(runner, ["users", "unset-admin", "boss@example.com"])  # ann is still an admin
    assert get(app, User, email="boss@example.com").is_admin is False
    ok(runner, ["users", "unset-admin", "boss@example.com"])  # idempotent for a non-admin
    invoke_fails(app, runner, ["users", "unset-admin", "ann@example.com"], "last admin")


# --- keys ---------------------------------------------------------------------------------

def test_keys_create_prints_only_the_key(app, runner, factory):
    factory.user("ann@example.com")
    result = ok(runner, ["keys", "create", "ann@example.com", "--name", "laptop"])
    full_key = result.stdout.strip()
    assert result.stdout == full_key + "\n"
    assert re.fullmatch(r"sk-[A-Za-z0-9]{40,}", full_key)
    key = get(app, ApiKey, key_hash=ApiKey.hash_key(full_key))
    assert key.name == "laptop" and key.user.email == "ann@example.com"
    assert key.models is None and key.allowed_ips is None and key.credit_limit_micro is None
    assert key.expires_at is None and key.rpm == 0 and not key.disabled
    with app.app_context():  # only the hash is stored
        stored = [str(v) for v in db.session.execute(db.select(ApiKey.__table__)).one()]
    assert full_key not in stored


def test_keys_create_with_every_option(app, runner, factory):
    factory.user("ann@example.com")
    full_key = ok(runner, [
        "keys", "create", "ann@example.com", "--name", "ci", "--models", "gpt-4o, claude-3",
        "--credit-limit", "2.5", "--expires-days", "7", "--ips", "10.0.0.0/8,192.168.1.7,::1",
        "--rpm", "30"]).stdout.strip()
    key = get(app, ApiKey, key_hash=ApiKey.hash_key(full_key))
    assert key.model_list == ["gpt-4o", "claude-3"]
    assert key.ip_list == ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]
    assert key.credit_limit_micro == 2_500_000
    assert key.rpm == 30
    assert abs(key.expires_at - (utcnow() + timedelta(days=7))) < timedelta(minutes=1)


@pytest.mark.parametrize("args, message", [
    (["keys", "create", "ghost@example.com", "--name", "k"], "no user with email"),
    (["keys", "create", "ann@example.com", "--name", "old"], "already has a key named 'old'"),
    (["keys", "create", "ann@example.com", "--name", "  "], "--name must be"),
    (["keys", "create", "ann@example.com", "--name", "k", "--credit-limit", "lots"],
     "not a number of credits"),
    (["keys", "create", "ann@example.com", "--name", "k", "--credit-limit", "-1"],
     "must not be negative"),
    (["keys", "create", "ann@example.com", "--name", "k", "--credit-limit", "0.0000001"],
     "at most 6 decimal places"),
    (["keys", "create", "ann@example.com", "--name", "k", "--ips", "10.0.0.0/33"],
     "'10.0.0.0/33' is not an IP address or CIDR range"),
    (["keys", "create", "ann@example.com", "--name", "k", "--ips", "1.2.3.4,office"],
     "'office'"),
    (["keys", "create", "ann@example.com", "--name", "k", "--expires-days", "0"], "--expires-days"),
    (["keys", "create", "ann@example.com", "--name", "k", "--expires-days", "99999999999"],
     "--expires-days"),
    (["keys", "create", "ann@example.com", "--name", "k", "--rpm", "-5"], "--rpm"),
    (["keys", "list", "ghost@example.com"], "no user with email"),
    (["keys", "disable", "ann@example.com", "missing"], "has no key named 'missing'"),
    (["keys", "enable", "ghost@example.com", "old"], "no user with email"),
    (["keys", "delete", "ann@example.com", "missing"], "has no key named 'missing'"),
])
def test_keys_errors(app, runner, factory, args, message):
    factory.user("ann@example.com")
    factory.key("ann@example.com", name="old")
    invoke_fails(app, runner, args, message)


def test_keys_list_never_shows_the_full_key(app, runner, factory):
    factory.user("ann@example.com")
    factory.user("bob@example.com")
    assert "has no keys" in ok(runner, ["keys", "list", "ann@example.com"]).stdout
    first = ok(runner, ["keys", "create", "ann@example.com", "--name", "one",
                        "--credit-limit", "3"]).stdout.strip()
    second = ok(runner, ["keys", "create", "ann@example.com", "--name", "two",
                         "--expires-days", "1"]).stdout.strip()
    ok(runner, ["keys", "create", "bob@example.com", "--name", "bobs"])

    listed = json.loads(ok(runner, ["keys", "list", "ann@example.com", "--json"]).stdout)
    assert [k["name"] for k in listed] == ["one", "two"]
    assert listed[0]["key"] == f"{first[:7]}…{first[-4:]}"
    assert listed[0]["credit_limit"] == "3" and listed[0]["status"] == "active"
    assert listed[1]["credit_limit"] is None and listed[1]["expires_at"]
    text = ok(runner, ["keys", "list", "ann@example.com"]).stdout
    assert "one" in text and "two" in text and "bobs" not in text
    for output in (text, json.dumps(listed, ensure_ascii=False)):
        assert first not in output and second not in output
        assert first[7:-4] not in output


def test_keys_disable_enable_delete(app, runner, factory):
    factory.user("ann@example.com")
    factory.key("ann@example.com", name="laptop")
    ok(runner, ["keys", "disable", "ann@example.com", "laptop"])
    assert get(app, ApiKey, name="laptop").disabled is True
    listed = json.loads(ok(runner, ["keys", "list", "ann@example.com", "--json"]).stdout)
    assert listed[0]["status"] == "disabled"
    ok(runner, ["keys", "enable", "ann@example.com", "laptop"])
    assert get(app, ApiKey, name="laptop").disabled is False
    assert "deleted" in ok(runner, ["keys", "delete", "ann@example.com", "laptop"]).stdout
    assert get(app, ApiKey, name="laptop") is None
    assert get(app, User, email="ann@example.com") is not None


def test_keys_list_marks_expired_keys(app, runner, factory):
    factory.user("ann@example.com")
    factory.key("ann@example.com", name="old", expires_at=utcnow() - timedelta(days=1))
    listed = json.loads(ok(runner, ["keys", "list", "ann@example.com", "--json"]).stdout)
    assert listed[0]["status"] == "expired"


def test_keys_with_the_same_name_are_refused_as_ambiguous(app, runner, factory):
    factory.user("ann@example.com")
    factory.key("ann@example.com", name="dup")  # the console may allow duplicate names
    factory.key("ann@example.com", name="dup")
    invoke_fails(app, runner, ["keys", "delete", "ann@example.com", "dup"], "2 keys named 'dup'")


# --- channels -----------------------------------------------------------------------------

def test_channels_add_and_list(app, runner):
    result = ok(runner, ["channels", "add", "main", "--type", "openai",
                         "--base-url", "https://api.openai.com/",
                         "--api-key", "sk-upstream-secret-123",
                         "--models", "gpt-4o,mini=gpt-4o-mini", "--priority", "5",
                         "--weight", "3"])
    assert "main" in result.stdout
    ok(runner, ["channels", "add", "local", "--type", "mock", "--models", "echo"])
    channel = get(app, Channel, name="main")
    assert channel.base_url == "https://api.openai.com"
    assert channel.api_key == "sk-upstream-secret-123"
    assert [(m.public_name, m.upstream_name) for m in channel.model_rows] == [
        ("gpt-4o", "gpt-4o"), ("mini", "gpt-4o-mini")]
    assert (channel.priority, channel.weight, channel.enabled) == (5, 3, True)

    listed = json.loads(ok(runner, ["channels", "list", "--json"]).stdout)
    assert [c["name"] for c in listed] == ["main", "local"]  # higher priority first
    assert listed[0] == {
        "name": "main", "type": "openai", "base_url": "https://api.openai.com",
        "models": "gpt-4o,mini=gpt-4o-mini", "priority": 5, "weight": 3, "enabled": True,
        "health": "healthy", "cooldown_until": None, "last_error": None, "api_key": "sk-…-123"}
    assert listed[1]["type"] == "mock" and listed[1]["base_url"] == ""
    text = ok(runner, ["channels", "list"]).stdout
    assert "main" in text and "healthy" in text and "gpt-4o,mini=gpt-4o-mini" in text
    for output in (text, json.dumps(listed)):
        assert "sk-upstream-secret-123" not in output and "upstream-secret" not in output


def test_channels_list_shows_cooldown_and_empty(app, runner, factory):
    assert "no channels" in ok(runner, ["channels", "list"]).stdout
    assert json.loads(ok(runner, ["channels", "list", "--json"]).stdout) == []
    factory.channel("flaky", base_url="https://example.com")
    with app.app_context():
        channel = db.session.scalar(db.select(Channel).filter_by(name="flaky"))
        channel.fail_count, channel.last_error = 3, "HTTP 503"
        channel.cooldown_until = utcnow() + timedelta(minutes=1)
        db.session.commit()
    info = json.loads(ok(runner, ["channels", "list", "--json"]).stdout)[0]
    assert info["health"] == "cooldown" and info["last_error"] == "HTTP 503"
    assert info["cooldown_until"]
    ok(runner, ["channels", "enable", "flaky"])  # back in service, health cleared
    info = json.loads(ok(runner, ["channels", "list", "--json"]).stdout)[0]
    assert info["health"] == "healthy" and info["cooldown_until"] is None


@pytest.mark.parametrize("args, message", [
    (["channels", "add", "taken", "--type", "openai", "--base-url", "https://x.test",
      "--models", "a"], "a channel named taken already exists"),
    (["channels", "add", "new", "--type", "openai", "--models", "a"],
     "--base-url is required for a openai channel"),
    (["channels", "add", "new", "--type", "anthropic", "--base-url", "ftp://x.test",
      "--models", "a"], "must be an http:// or https:// URL"),
    (["channels", "add", "new", "--type", "gemini", "--base-url", "api.example.com",
      "--models", "a"], "must be an http:// or https:// URL"),
    (["channels", "add", "new", "--type", "azure", "--base-url", "https://x.test",
      "--models", "a"], "'azure' is not one of"),
    (["channels", "add", "new", "--type", "mock", "--models", " , "], "at least one model"),
    (["channels", "add", "new", "--type", "mock", "--models", "a,b=,c"], "bad model entry 'b='"),
    (["channels", "add", "new", "--type", "mock", "--models", "a,a=b"], "'a' is listed twice"),
    (["channels", "add", "new", "--type", "mock", "--models", "a", "--weight", "0"], "--weight"),
    (["channels", "add", "new", "--type", "mock"], "--models"),
    (["channels", "edit", "ghost", "--priority", "1"], "no channel named ghost"),
    (["channels", "edit", "taken"], "nothing to change"),
    (["channels", "edit", "taken", "--base-url", "nope"], "must be an http:// or https:// URL"),
    (["channels", "edit", "taken", "--models", "x,x"], "listed twice"),
    (["channels", "enable", "ghost"], "no channel named ghost"),
    (["channels", "disable", "ghost"], "no channel named ghost"),
    (["channels", "delete", "ghost"], "no channel named ghost"),
])
def test_channels_errors(app, runner, factory, args, message):
    factory.channel("taken", base_url="https://x.test")
    invoke_fails(app, runner, args, message)


def test_channels_edit(app, runner, factory):
    factory.channel("main", base_url="https://old.test", api_key="sk-old-key-000",
                    models="gpt-4o,mini=gpt-4o-mini")
    ok(runner, ["channels", "edit", "main", "--priority", "9"])
    channel = get(app, Channel, name="main")
    assert channel.priority == 9 and channel.base_url == "https://old.test"
    assert channel.models_spec == "gpt-4o,mini=gpt-4o-mini"

    ok(runner, ["channels", "edit", "main", "--base-url", "http://10.0.0.2:8000/v1/",
                "--api-key", "sk-new-key-111", "--models", "gpt-4o,mini=gpt-4o-mini-2,o3",
                "--weight", "4"])
    channel = get(app, Channel, name="main")
    assert channel.base_url == "http://10.0.0.2:8000/v1"
    assert channel.api_key == "sk-new-key-111" and channel.weight == 4
    assert channel.models_spec == "gpt-4o,mini=gpt-4o-mini-2,o3"
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(ChannelModel.id))) == 3


def test_channels_enable_disable_delete(app, runner, factory):
    factory.channel("main", base_url="https://x.test", models="a,b")
    ok(runner, ["channels", "disable", "main"])
    assert get(app, Channel, name="main").enabled is False
    assert json.loads(ok(runner, ["channels", "list", "--json"]).stdout)[0]["health"] == "disabled"
    ok(runner, ["channels", "enable", "main"])
    assert get(app, Channel, name="main").enabled is True
    assert "deleted" in ok(runner, ["channels", "delete", "main"]).stdout
    assert get(app, Channel, name="main") is None
    assert get(app, ChannelModel, public_name="a") is None


# --- groups -------------------------------------------------------------------------------

def test_groups_set_creates_then_updates(app, runner):
    result = ok(runner, ["groups", "set", "vip", "--models", "gpt-4o, o3", "--rpm", "600",
                         "--tpm", "100000", "--multiplier", "0.8"])
    assert "created group vip" in result.stdout
    group = get(app, Group, name="vip")
    assert (group.models, group.rpm, group.tpm, group.multiplier_ppm) == (
        "gpt-4o,o3", 600, 100000, 800_000)

    assert "updated group vip" in ok(runner, ["groups", "set", "vip", "--rpm", "0"]).stdout
    group = get(app, Group, name="vip")
    assert (group.models, group.rpm, group.tpm, group.multiplier_ppm) == (
        "gpt-4o,o3", 0, 100000, 800_000)
    ok(runner, ["groups", "set", "vip", "--rpm", "0"])  # idempotent
    ok(runner, ["groups", "set", "vip", "--models", "*", "--multiplier", "1.25"])
    group = get(app, Group, name="vip")
    assert group.models == "*" and group.multiplier_ppm == 1_250_000
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Group.id)).filter_by(name="vip")) == 1

    ok(runner, ["groups", "set", "plain"])  # new group with the defaults
    group = get(app, Group, name="plain")
    assert (group.models, group.rpm, group.tpm, group.multiplier_ppm) == ("*", 60, 0, 1_000_000)


def test_groups_list(app, runner, factory):
    ok(runner, ["groups", "set", "vip", "--models", "a,b", "--multiplier", "0.5"])
    factory.user("ann@example.com", group="vip")
    listed = json.loads(ok(runner, ["groups", "list", "--json"]).stdout)
    assert listed == [
        {"name": "default", "models": "*", "rpm": 60, "tpm": 0, "concurrency": 0, "multiplier": "1",
         "multiplier_ppm": 1_000_000, "members": 0},
        {"name": "vip", "models": "a,b", "rpm": 60, "tpm": 0, "concurrency": 0, "multiplier": "0.5",
         "multiplier_ppm": 500_000, "members": 1},
    ]
    text = ok(runner, ["groups", "list"]).stdout
    assert "vip" in text and "multiplier=0.5" in text and "members=1" in text


def test_groups_delete(app, runner, factory):
    ok(runner, ["groups", "set", "empty"])
    assert "deleted group empty" in ok(runner, ["groups", "delete", "empty"]).stdout
    assert get(app, Group, name="empty") is None
    ok(runner, ["groups", "set", "team"])
    factory.user("ann@example.com", group="team")
    invoke_fails(app, runner, ["groups", "delete", "team"], "still has 1 member")
    invoke_fails(app, runner, ["groups", "delete", "default"], "cannot be deleted")
    invoke_fails(app, runner, ["groups", "delete", "ghost"], "no group named ghost")
    ok(runner, ["users", "set-group", "ann@example.com", "default"])
    ok(runner, ["groups", "delete", "team"])
    assert get(app, Group, name="team") is None


@pytest.mark.parametrize("args, message", [
    (["groups", "set", "vip", "--multiplier", "-1"], "must not be negative"),
    (["groups", "set", "vip", "--multiplier", "cheap"], "bad --multiplier"),
    (["groups", "set", "vip", "--multiplier", "1.0000001"], "at most 6 decimal places"),
    (["groups", "set", "vip", "--rpm", "-1"], "--rpm"),
    (["groups", "set", "vip", "--tpm", "many"], "--tpm"),
    (["groups", "set", "vip", "--models", " ,"], "--models needs model names"),
    (["groups", "set", "new", "--multiplier", "x"], "bad --multiplier"),
    (["groups", "set", "x" * 65], "1 to 64 characters"),
])
def test_groups_errors(app, runner, args, message):
    ok(runner, ["groups", "set", "vip", "--multiplier", "2"])
    invoke_fails(app, runner, args, message)


# --- init-db and bootstrap as a person runs them -------------------------------------------

def flask_cli(db_url, *args, **env):
    """Run `flask --app app ARGS` in a subprocess against `db_url`, as `make run` does."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("TOKENOPEN_ADMIN_") and k != "TOKENOPEN_REDIS_URL"}
    environ.update({"TOKENOPEN_DATABASE_URL": db_url, "TOKENOPEN_SECRET_KEY": "cli-test"}, **env)
    result = subprocess.run([PYTHON, "-m", "flask", "--app", "app", *args], cwd=ROOT,
                            env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def users_in(db_url):
    """{email: User} of every user in the database at `db_url` (detached, for reading)."""
    from app import create_app
    app = create_app({"SQLALCHEMY_DATABASE_URI": db_url, "SECRET_KEY": "x", "TESTING": True})
    with app.app_context():
        users = {u.email: u for u in db.session.scalars(db.select(User))}
        db.session.expunge_all()
        db.engine.dispose()
    return users


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_db_url(request, tmp_path):
    """An empty database that has never seen the schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fresh.db"
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    return postgres_database_url(f"tokenopen_cli_{worker}")


def test_init_db_and_bootstrap_on_a_fresh_database(fresh_db_url):
    assert "up to date" in flask_cli(fresh_db_url, "init-db")
    out = flask_cli(fresh_db_url, "bootstrap")
    match = re.search(r"Created admin admin@localhost with password: (\S+)", out)
    assert match, out
    assert "shown only once" in out
    users = users_in(fresh_db_url)
    assert list(users) == ["admin@localhost"]
    admin = users["admin@localhost"]
    assert admin.is_admin and admin.group.name == "default"
    assert admin.check_password(match.group(1))

    assert flask_cli(fresh_db_url, "bootstrap").strip() == ""  # second start: nothing new
    assert "up to date" in flask_cli(fresh_db_url, "init-db")
    users = users_in(fresh_db_url)
    assert list(users) == ["admin@localhost"]
    assert users["admin@localhost"].check_password(match.group(1))


def test_bootstrap_honours_admin_environment(fresh_db_url):
    env = {"TOKENOPEN_ADMIN_EMAIL": "Owner@Example.com",
           "TOKENOPEN_ADMIN_PASSWORD": "chosen-password-1"}
    out = flask_cli(fresh_db_url, "bootstrap", **env)
    assert "created admin owner@example.com" in out.lower()
    assert "chosen-password-1" not in out  # a password the admin chose is never echoed
    users = users_in(fresh_db_url)
    assert list(users) == ["owner@example.com"]
    assert users["owner@example.com"].is_admin
    assert users["owner@example.com"].check_password("chosen-password-1")
    assert flask_cli(fresh_db_url, "bootstrap", **env).strip() == ""


def test_concurrency_on_groups_and_keys(app, runner):
    from extensions import db
    from models import ApiKey, Group
    assert runner.invoke(args=["groups", "set", "team", "--concurrency", "4"]).exit_code == 0
    assert runner.invoke(args=["users", "create", "c@example.com", "--password", "password123",
                               "--group", "team"]).exit_code == 0
    created = runner.invoke(args=["keys", "create", "c@example.com", "--name", "k",
                                  "--tpm", "1000", "--concurrency", "2"])
    assert created.exit_code == 0 and created.output.startswith("sk-")
    changed = runner.invoke(args=["keys", "set", "c@example.com", "k", "--concurrency", "3"])
    assert changed.exit_code == 0 and "concurrency=3" in changed.output
    with app.app_context():
        key = db.session.scalar(db.select(ApiKey))
        assert (key.tpm, key.concurrency, key.rpm) == (1000, 3, 0)  # only what was given changed
        assert db.session.scalar(db.select(Group).filter_by(name="team")).concurrency == 4


# --- `python -m cli`: the same commands without the flask command's start-up cost ----------

def admin_cli(db_url, *args, entry=("-m", "cli"), check=True, **env):
    """Run `python -m cli ARGS` (or another entry point) against `db_url`."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("TOKENOPEN_ADMIN_") and k != "TOKENOPEN_REDIS_URL"}
    environ.update({"TOKENOPEN_DATABASE_URL": db_url, "TOKENOPEN_SECRET_KEY": "cli-test"}, **env)
    result = subprocess.run([PYTHON, *entry, *args], cwd=ROOT, env=environ,
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_python_m_cli_runs_the_commands_flask_runs(tmp_path):
    db_url = f"sqlite:///{tmp_path}/fast.db"
    flask = ("-m", "flask", "--app", "app")
    assert "Created admin admin@localhost" in admin_cli(db_url, "bootstrap").stdout
    admin_cli(db_url, "users", "create", "ann@example.com", "--password", "password123")
    admin_cli(db_url, "credits", "grant", "ann@example.com", "12.5")
    admin_cli(db_url, "channels", "add", "up", "--type", "openai",
              "--base-url", "https://api.example.com", "--api-key", "sk-upstream-secret",
              "--models", "gpt-4o-mini")
    admin_cli(db_url, "prices", "set", "gpt-4o-mini", "--input", "1", "--output", "2")
    key = admin_cli(db_url, "keys", "create", "ann@example.com", "--name", "k").stdout
    assert key.strip().splitlines()[-1].startswith("sk-")
    for args in (["users", "show", "ann@example.com", "--json"], ["channels", "list", "--json"],
                 ["billing", "check"], ["keys", "list", "ann@example.com"]):
        fast, slow = admin_cli(db_url, *args), admin_cli(db_url, *args, entry=flask)
        assert fast.stdout == slow.stdout and fast.stdout, args
    channels = admin_cli(db_url, "channels", "list", "--json").stdout
    assert "up" in [c["name"] for c in json.loads(channels)]
    assert "sk-upstream-secret" not in channels
    with_ann = users_in(db_url)["ann@example.com"]
    assert with_ann.balance_micro == 12_500_000

    # the same clean failures, the same command list (less Flask-Limiter's plugin)
    failed = admin_cli(db_url, "users", "show", "nobody@example.com", check=False)
    assert failed.returncode == 1 and "no user with email" in failed.stderr
    helped = admin_cli(db_url, "--help").stdout
    for group in ("users", "keys", "channels", "prices", "credits", "billing", "bootstrap"):
        assert f"\n  {group} " in helped
    assert "limiter" not in helped and "\n  run " not in helped
    bad_key = admin_cli(db_url, "channels", "add", "up2", "--type", "openai",
                        "--base-url", "https://api.example.com", "--api-key", "sk-x",
                        "--models", "m", check=False, TOKENOPEN_ENCRYPTION_KEY="not-a-key")
    assert bad_key.returncode != 0 and "is not a Fernet key" in bad_key.stderr
