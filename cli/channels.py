"""channels commands: the upstream providers the gateway routes to."""
from urllib.parse import urlsplit

import click

from bootstrap import reencrypt_channel_keys
from cli.common import channel_or_fail, echo_json, fail, iso
from extensions import db
from models import MAX_PRIORITY, MAX_WEIGHT, Channel, split_list

TYPES = ("openai", "anthropic", "gemini", "mock")
PRIORITY = click.IntRange(-MAX_PRIORITY, MAX_PRIORITY)
WEIGHT = click.IntRange(1, MAX_WEIGHT)
NAME_MAX = 100  # Channel.name column size


def parse_base_url(url):
    """An http(s) provider root, trailing slash dropped; a clean failure otherwise."""
    url = (url or "").strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        fail(f"--base-url must be an http:// or https:// URL, got {url!r}")
    return url


def parse_models_spec(spec):
    """Check a 'a,b,pub=upstream' spec: names present, each public name once."""
    seen = set()
    for item in split_list(spec):
        public, eq, upstream = (part.strip() for part in item.partition("="))
        if not public or (eq and not upstream):
            fail(f"bad model entry {item!r}: use name or public=upstream")
        if public in seen:
            fail(f"model {public!r} is listed twice")
        seen.add(public)
    if not seen:
        fail("--models needs at least one model")
    return spec


def channel_summary(channel):
    """What `channels list --json` prints for one channel; the upstream key is masked."""
    return {
        "name": channel.name,
        "type": channel.type,
        "base_url": channel.base_url,
        "models": channel.models_spec,
        "priority": channel.priority,
        "weight": channel.weight,
        "enabled": channel.enabled,
        "health": channel.health(),
        "cooldown_until": iso(channel.cooldown_until),
        "last_error": channel.last_error,
        "api_key": channel.masked_key,
    }


def register(app):
    """Attach the channels command group."""

    @app.cli.group("channels")
    def channels():
        """Upstream provider connections ("channels")."""

    @channels.command("add")
    @click.argument("name")
    @click.option("--type", "kind", required=True, type=click.Choice(TYPES))
    @click.option("--base-url",
                  help="Provider root, e.g. https://api.openai.com (not needed for mock).")
    @click.option("--api-key", default="", help="The upstream provider's API key.")
    @click.option("--models", required=True, help="m1,m2 or public=upstream entries.")
    @click.option("--priority", type=PRIORITY, default=0, show_default=True,
                  help="Higher is tried first.")
    @click.option("--weight", type=WEIGHT, default=1, show_default=True,
                  help="Share among channels of equal priority.")
    def channels_add(name, kind, base_url, api_key, models, priority, weight):
        """Add a channel serving the given models."""
        name = name.strip()
        if not name or len(name) > NAME_MAX:
            fail(f"a channel name must be 1 to {NAME_MAX} characters")
        if db.session.scalar(db.select(Channel.id).filter_by(name=name)):
            fail(f"a channel named {name} already exists")
        if base_url is None and kind != "mock":
            fail(f"--base-url is required for a {kind} channel")
        channel = Channel(name=name, type=kind,
                          base_url=parse_base_url(base_url) if base_url is not None else "",
                          api_key=api_key.strip(), priority=priority, weight=weight, enabled=True)
        channel.set_models(parse_models_spec(models))
        db.session.add(channel)
        db.session.commit()
        click.echo(f"added {kind} channel {name} serving {channel.models_spec}")

    @channels.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def channels_list(as_json):
        """List channels with their health; upstream keys are masked."""
        rows = db.session.scalars(db.select(Channel).order_by(
            Channel.priority.desc(), Channel.name)).all()
        summaries = [channel_summary(c) for c in rows]
        if as_json:
            echo_json(summaries)
            return
        if not summaries:
            click.echo("no channels")
        for info in summaries:
            click.echo(f"{info['name']}  {info['type']}  {info['base_url'] or '-'}"
                       f"  models={info['models']}  priority={info['priority']}"
                       f"  weight={info['weight']}  {info['health']}  key={info['api_key'] or '-'}")

    @channels.command("edit")
    @click.argument("name")
    @click.option("--base-url")
    @click.option("--api-key")
    @click.option("--models", help="Replaces the whole model list.")
    @click.option("--priority", type=PRIORITY)
    @click.option("--weight", type=WEIGHT)
    def channels_edit(name, base_url, api_key, models, priority, weight):
        """Change the given settings of a channel."""
        channel = channel_or_fail(name)
        if all(v is None for v in (base_url, api_key, models, priority, weight)):
            fail("nothing to change: give --base-url, --api-key, --models, --priority or --weight")
        if base_url is not None:
            channel.base_url = parse_base_url(base_url)
        if api_key is not None:
            channel.api_key = api_key.strip()
        if models is not None:
            parse_models_spec(models)
            channel.set_models(models)
        if priority is not None:
            channel.priority = priority
        if weight is not None:
            channel.weight = weight
        db.session.commit()
        click.echo(f"updated channel {channel.name}")

    @channels.command("reencrypt")
    def channels_reencrypt():
        """Re-encrypt every upstream key under the first TOKENOPEN_ENCRYPTION_KEY (rotation)."""
        changed, unreadable = reencrypt_channel_keys()
        click.echo(f"re-encrypted {changed} channel key(s) under the current encryption key")
        if unreadable:
            fail("cannot decrypt the key of channel(s) " + ", ".join(unreadable) +
                 ": add the encryption key they were written with to TOKENOPEN_ENCRYPTION_KEY "
                 "(after the new one) and run this again, or set their keys anew")

    @channels.command("enable")
    @click.argument("name")
    def channels_enable(name):
        """Put a channel back in service, clearing its failure count and cool-down."""
        channel = channel_or_fail(name)
        channel.enabled = True
        channel.fail_count = 0
        channel.cooldown_until = None
        db.session.commit()
        from blueprints.api.routing import channel_generation, failures_in_a_row
        # the count all workers share, too
        failures_in_a_row(channel.id, reset=True, generation=channel_generation(channel))
        click.echo(f"enabled channel {channel.name}")

    @channels.command("disable")
    @click.argument("name")
    def channels_disable(name):
        """Take a channel out of routing."""
        channel = channel_or_fail(name)
        channel.enabled = False
        db.session.commit()
        click.echo(f"disabled channel {channel.name}")

    @channels.command("delete")
    @click.argument("name")
    def channels_delete(name):
        """Delete a channel (its request logs stay)."""
        channel = channel_or_fail(name)
        db.session.delete(channel)
        db.session.commit()
        click.echo(f"deleted channel {name}")
