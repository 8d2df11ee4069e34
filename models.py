"""All SQLAlchemy models. Money is always an integer of micro-credits (1 credit = 1,000,000)."""
import functools
import hashlib
import secrets
from datetime import datetime, timezone

from flask_login import UserMixin
from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint, event
from sqlalchemy.orm import Mapped, mapped_column, object_session, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from encryption import SecretUnreadable, secret_box
from extensions import db

MICRO = 1_000_000  # micro-credits per credit
ALL_MODELS = "*"

# The largest numbers people may type (console forms and CLI): far above any real need and
# inside what the columns hold (INTEGER is 32-bit on PostgreSQL), so input is never a 500.
MAX_PRIORITY = 1_000_000  # channels.priority, either sign
MAX_WEIGHT = 10_000
MAX_RPM = 1_000_000
MAX_TPM = 1_000_000_000
MAX_EXPIRY_DAYS = 3650  # keys and redemption codes
MAX_OUTPUT_CAP = 10_000_000  # tokens


def utcnow():
    """Naive UTC now: stored the same way on SQLite and PostgreSQL."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def split_list(text):
    """'a, b,,c' -> ['a', 'b', 'c']; None or '' -> []."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


class Group(db.Model):
    """A set of members sharing model access, rate limits and a price multiplier."""
    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    models: Mapped[str] = mapped_column(Text, default=ALL_MODELS)  # "*" or "a,b"
    rpm: Mapped[int] = mapped_column(default=60)  # per user, 0 = unlimited
    tpm: Mapped[int] = mapped_column(default=0)  # per user, 0 = unlimited
    concurrency: Mapped[int] = mapped_column(default=0)  # requests in flight per user, 0 = unlimited
    # Price multiplier in parts per million (1.0 = 1_000_000) so cost math stays integral.
    multiplier_ppm: Mapped[int] = mapped_column(BigInteger, default=MICRO)

    def allows_model(self, model):
        """True when members of this group may call `model`."""
        return self.models.strip() == ALL_MODELS or model in split_list(self.models)


class User(UserMixin, db.Model):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    is_admin: Mapped[bool] = mapped_column(default=False)
    disabled: Mapped[bool] = mapped_column(default=False)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"))
    # Settled balance; equals the sum of this user's ledger rows.
    balance_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    # Credits held by in-flight requests; equals the sum of open reservations.
    reserved_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # What the session cookie names instead of the id; a new password rotates it, which
    # signs out every other session and "remember me" cookie of this user.
    session_token: Mapped[str] = mapped_column(String(32), unique=True,
                                               default=lambda: secrets.token_hex(16))

    group: Mapped[Group] = relationship(lazy="joined")

    @property
    def is_active(self):
        return not self.disabled

    def get_id(self):
        return self.session_token

    @property
    def available_micro(self):
        return self.balance_micro - self.reserved_micro

    def set_password(self, password):
        """Hash with scrypt and sign out the user's other sessions."""
        self.password_hash = generate_password_hash(password)
        self.rotate_session_token()

    def rotate_session_token(self):
        """Invalidate every session and "remember me" cookie issued to this user so far."""
        self.session_token = secrets.token_hex(16)

    def check_password(self, password):
        return check_password_hash(self.password_hash, password)

    @classmethod
    def authenticate(cls, email, password):
        """The user with this email and password, else None. An unknown email costs one
        password hash too, so the answer's timing does not tell which accounts exist."""
        user = db.session.scalar(db.select(cls).filter_by(email=email))
        if user is None:
            check_password_hash(_dummy_password_hash(), password)
            return None
        return user if user.check_password(password) else None


@functools.cache
def _dummy_password_hash():
    """A hash made like real ones (same scrypt cost) that no password matches in practice."""
    return generate_password_hash(secrets.token_hex(32))


class ApiKey(db.Model):
    """An sk- key. Only its SHA-256 is stored; the full key is shown once at creation."""
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # "sk-" + first chars, for display
    last4: Mapped[str] = mapped_column(String(4))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    disabled: Mapped[bool] = mapped_column(default=False)
    models: Mapped[str | None] = mapped_column(Text)  # None = whatever the group allows
    allowed_ips: Mapped[str | None] = mapped_column(Text)  # comma-separated CIDRs
    credit_limit_micro: Mapped[int | None] = mapped_column(BigInteger)  # None = no limit
    spent_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    rpm: Mapped[int] = mapped_column(default=0)  # 0 = unlimited
    tpm: Mapped[int] = mapped_column(default=0)
    concurrency: Mapped[int] = mapped_column(default=0)  # requests in flight, 0 = unlimited

    user: Mapped[User] = relationship(lazy="joined")

    @staticmethod
    def hash_key(full_key):
        return hashlib.sha256(full_key.encode()).hexdigest()

    @classmethod
    def generate(cls, user, name, **fields):
        """Return (ApiKey, full_key); the caller adds it to the session."""
        full_key = "sk-" + secrets.token_urlsafe(36).replace("-", "a").replace("_", "b")[:48]
        key = cls(user_id=user.id, name=name, key_hash=cls.hash_key(full_key),
                  prefix=full_key[:7], last4=full_key[-4:], **fields)
        return key, full_key

    @property
    def display(self):
        return f"{self.prefix}…{self.last4}"

    @property
    def model_list(self):
        return split_list(self.models)

    @property
    def ip_list(self):
        return split_list(self.allowed_ips)

    def is_expired(self, now=None):
        return self.expires_at is not None and self.expires_at <= (now or utcnow())


class Channel(db.Model):
    """An upstream provider connection; serves the models in its ChannelModel rows."""
    __tablename__ = "channels"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    type: Mapped[str] = mapped_column(String(32))  # openai | anthropic | gemini | mock
    base_url: Mapped[str] = mapped_column(String(500), default="")
    # The upstream key as stored: a Fernet token (encryption.py), or plain text written
    # before encryption existed. Read and write it through `api_key`.
    api_key_stored: Mapped[str] = mapped_column("api_key", Text, default="")
    priority: Mapped[int] = mapped_column(default=0)  # higher is tried first
    weight: Mapped[int] = mapped_column(default=1)
    enabled: Mapped[bool] = mapped_column(default=True)
    # Health, written only when it changes so the hot path stays read-only.
    fail_count: Mapped[int] = mapped_column(default=0)
    cooldown_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_test_ms: Mapped[int | None]
    # The console's Test button: when it last ran and whether it passed (None: never, or
    # the channel was edited since, so the old result no longer says anything).
    last_test_at: Mapped[datetime | None]
    last_test_ok: Mapped[bool | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model_rows: Mapped[list["ChannelModel"]] = relationship(
        back_populates="channel", cascade="all, delete-orphan", lazy="selectin",
        order_by="ChannelModel.id")

    @property
    def models_spec(self):
        """The models as the CLI takes them: 'a,b,pub=upstream'."""
        return ",".join(m.public_name if m.public_name == m.upstream_name
                        else f"{m.public_name}={m.upstream_name}" for m in self.model_rows)

    def set_models(self, spec):
        """Replace the served models from a 'a,b,pub=upstream' spec."""
        session = object_session(self)
        if session is not None and self.model_rows:
            # Delete the old rows first: a kept public name would clash on insert.
            self.model_rows = []
            session.flush()
        rows = []
        for item in split_list(spec):
            public, _, upstream = item.partition("=")
            rows.append(ChannelModel(public_name=public.strip(),
                                     upstream_name=(upstream or public).strip()))
        self.model_rows = rows

    @property
    def api_key(self):
        """The upstream key in plain text; SecretUnreadable when no configured key decrypts it.
        Decrypted once per loaded row (see _decrypt_key_on_load), not on every read."""
        stored = self.api_key_stored
        cached = self.__dict__.get("_api_key_plain")
        if cached is None or cached[0] != stored:
            cached = (stored, secret_box().decrypt(stored))
            self.__dict__["_api_key_plain"] = cached
        return cached[1]

    @api_key.setter
    def api_key(self, text):
        text = text or ""
        self.api_key_stored = secret_box().encrypt(text)
        self.__dict__["_api_key_plain"] = (self.api_key_stored, text)

    def reencrypt_key(self):
        """Store the key under the first encryption key; True when the row changed."""
        box = secret_box()
        if box.is_current(self.api_key_stored):
            return False
        self.api_key_stored = box.encrypt(box.decrypt(self.api_key_stored))
        return True

    @property
    def masked_key(self):
        """Enough of the key to recognise it ('sk-…abcd'), never the key itself."""
        try:
            key = self.api_key
        except SecretUnreadable:
            return "(unreadable: wrong encryption key)"
        return (key[:3] + "…" + key[-4:]) if len(key) > 10 else ("…" if key else "")

    def health(self, now=None):
        """'disabled', 'cooldown', 'failing' (its last test failed), 'degraded' or 'healthy'."""
        if not self.enabled:
            return "disabled"
        if self.cooldown_until and self.cooldown_until > (now or utcnow()):
            return "cooldown"
        if self.last_test_ok is False:
            return "failing"
        return "degraded" if self.fail_count else "healthy"


@event.listens_for(Channel, "load")
@event.listens_for(Channel, "refresh")
def _decrypt_key_on_load(channel, *_):
    """Decrypt while the app context that loaded the row is there: the plain key is then
    at hand wherever the row goes (the routing cache, a detached object)."""
    if "api_key_stored" not in channel.__dict__:
        return  # not loaded by this refresh: reading it here would issue SQL inside a load
    try:
        channel.api_key
    except SecretUnreadable:
        pass  # reported where the key is needed (routing skips the channel, masked_key says so)


class ChannelModel(db.Model):
    """One model a channel serves: the public name users call, the name sent upstream."""
    __tablename__ = "channel_models"
    __table_args__ = (UniqueConstraint("channel_id", "public_name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    public_name: Mapped[str] = mapped_column(String(200), index=True)
    upstream_name: Mapped[str] = mapped_column(String(200))

    channel: Mapped[Channel] = relationship(back_populates="model_rows")


class ModelPrice(db.Model):
    """Credits per 1M tokens, stored as micro-credits per 1M tokens; per-request is flat."""
    __tablename__ = "model_prices"
    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(200), unique=True)
    input_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    output_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_input_micro: Mapped[int | None] = mapped_column(BigInteger)  # None = input price
    cache_write_micro: Mapped[int | None] = mapped_column(BigInteger)  # None = input price
    per_request_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    per_image_micro: Mapped[int] = mapped_column(BigInteger, default=0)  # flat, per image
    per_second_micro: Mapped[int] = mapped_column(BigInteger, default=0)  # flat, per audio second
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LedgerEntry(db.Model):
    """One change of a user's balance. sum(amount_micro) per user == User.balance_micro."""
    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_user_time", "user_id", "created_at"),)
    # "overrun": what an upstream produced beyond the cap it was sent, charged past the hold.
    KINDS = ("grant", "redemption", "charge", "overrun", "refund", "adjustment")
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    amount_micro: Mapped[int] = mapped_column(BigInteger)  # signed
    balance_after_micro: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reservation(db.Model):
    """Credits held for one in-flight request (a "hold"), keyed by its request id.

    Its worker renews `lease_until` while the request lives and checkpoints what has been
    delivered so far; once the lease lapses (the worker died) the sweeper settles the hold at
    its checkpoint and writes the request's log row from the context kept here.
    """
    __tablename__ = "reservations"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    # No other index: each would be written twice a request, and the table only holds the
    # requests in flight, which a scan reads faster (migration 0005).
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # No foreign key: deleting a key must not lock hold rows (the relay locks hold -> user ->
    # key; a cascade would lock key -> hold and deadlock), and a hold outlives its key.
    key_id: Mapped[int | None]
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime] = mapped_column(default=utcnow)
    # What the sweeper needs to log the request if its worker dies.
    key_name: Mapped[str | None] = mapped_column(String(100))
    model: Mapped[str | None] = mapped_column(String(200))
    endpoint: Mapped[str | None] = mapped_column(String(64))
    is_stream: Mapped[bool] = mapped_column(default=False)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    channel_id: Mapped[int | None]
    channel_name: Mapped[str | None] = mapped_column(String(100))
    # The last checkpoint: usage delivered so far and its cost.
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    checkpoint_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    checkpoint_at: Mapped[datetime | None]


class RedemptionCode(db.Model):
    __tablename__ = "redemption_codes"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    batch: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    expires_at: Mapped[datetime | None]
    redeemed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    redeemed_at: Mapped[datetime | None]
    # An admin revoked it before use; revoking also sets expires_at, which redeeming checks.
    revoked_at: Mapped[datetime | None]

    @staticmethod
    def new_code():
        return secrets.token_hex(16)


class RequestLog(db.Model):
    """One row per /v1 request, success or not."""
    __tablename__ = "request_logs"
    __table_args__ = (
        Index("ix_logs_user_time", "user_id", "created_at"),
        Index("ix_logs_time", "created_at"),
        # The console's model and key filters stay fast on a million rows even when they match
        # few or none (otherwise the newest-first scan walks the whole time index).
        Index("ix_logs_model_time", "model", "created_at"),
        Index("ix_logs_key_time", "key_name", "created_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # No foreign keys on key and channel: a key or channel deleted while its request was in
    # flight must not make the log row (and the charge committed with it) fail. Names are kept.
    key_id: Mapped[int | None]
    key_name: Mapped[str | None] = mapped_column(String(100))
    model: Mapped[str | None] = mapped_column(String(200))
    channel_id: Mapped[int | None]
    channel_name: Mapped[str | None] = mapped_column(String(100))
    endpoint: Mapped[str] = mapped_column(String(64))
    is_stream: Mapped[bool] = mapped_column(default=False)
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    cached_tokens: Mapped[int] = mapped_column(default=0)
    credits_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16))  # Success | Failed | Timeout
    http_status: Mapped[int]
    latency_ms: Mapped[int] = mapped_column(default=0)
    ttft_ms: Mapped[int | None]
    estimated: Mapped[bool] = mapped_column(default=False)
    billing: Mapped[str] = mapped_column(String(16), default="void")  # billed | estimated | void
    error: Mapped[str | None] = mapped_column(Text)
    client_ip: Mapped[str | None] = mapped_column(String(64))


class UsageDaily(db.Model):
    """Per day × user × key × model rollup of RequestLog, kept by the log writer for charts."""
    __tablename__ = "usage_daily"
    __table_args__ = (UniqueConstraint("day", "user_id", "key_id", "model", name="uq_usage_daily"),
                      Index("ix_usage_daily_user_day", "user_id", "day"))
    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[str] = mapped_column(String(10), index=True)  # YYYY-MM-DD (UTC)
    user_id: Mapped[int] = mapped_column(default=0)
    key_id: Mapped[int] = mapped_column(default=0)  # 0 when the key is gone
    key_name: Mapped[str] = mapped_column(String(100), default="")
    model: Mapped[str] = mapped_column(String(200), default="")
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_micro: Mapped[int] = mapped_column(BigInteger, default=0)


class Setting(db.Model):
    """Admin-editable settings that override config defaults (registration, signup bonus...)."""
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)

    @staticmethod
    def get(key, default=None):
        row = db.session.get(Setting, key)
        return row.value if row else default

    @staticmethod
    def put(key, value):
        row = db.session.get(Setting, key)
        if row is None:
            db.session.add(Setting(key=key, value=str(value)))
        else:
            row.value = str(value)
