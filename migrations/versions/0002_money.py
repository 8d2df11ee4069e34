"""money under faults: hold leases and checkpoints, richer prices, log rows without key/channel FKs

Revision ID: 0002_money
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0002_money"
down_revision = "0001"
branch_labels = None
depends_on = None

HOLD_COLUMNS = (
    ("key_name", sa.String(length=100)), ("model", sa.String(length=200)),
    ("endpoint", sa.String(length=64)), ("client_ip", sa.String(length=64)),
    ("channel_id", sa.Integer()), ("channel_name", sa.String(length=100)),
    ("checkpoint_at", sa.DateTime()),
)
SQLITE_FK_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
HOLD_COUNTERS = ("prompt_tokens", "completion_tokens", "cached_tokens", "checkpoint_micro")


def _foreign_keys(bind, table):
    """Names of `table`'s foreign keys on key_id / channel_id (named differently per database)."""
    return [fk["name"] for fk in sa.inspect(bind).get_foreign_keys(table)
            if fk["constrained_columns"] in (["key_id"], ["channel_id"])]


def upgrade():
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(), nullable=False,
                                      server_default=sa.func.current_timestamp()))
        for name, type_ in HOLD_COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
        batch_op.add_column(sa.Column("is_stream", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        for name in HOLD_COUNTERS:
            batch_op.add_column(sa.Column(name, sa.BigInteger(), nullable=False,
                                          server_default="0"))
        batch_op.create_index(batch_op.f("ix_reservations_lease_until"), ["lease_until"])
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.alter_column("lease_until", server_default=None)
        batch_op.alter_column("is_stream", server_default=None)
        for name in HOLD_COUNTERS:
            batch_op.alter_column(name, server_default=None)

    with op.batch_alter_table("model_prices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache_write_micro", sa.BigInteger(), nullable=True))
        for name in ("per_image_micro", "per_second_micro"):
            batch_op.add_column(sa.Column(name, sa.BigInteger(), nullable=False,
                                          server_default="0"))
    with op.batch_alter_table("model_prices", schema=None) as batch_op:
        for name in ("per_image_micro", "per_second_micro"):
            batch_op.alter_column(name, server_default=None)

    # Log rows and holds outlive the key and channel they name (and deleting a key must not
    # lock hold rows): drop those foreign keys.
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # SQLite's foreign keys are unnamed: name them by convention, then rebuild without them.
        with op.batch_alter_table("request_logs", recreate="always",
                                  naming_convention=SQLITE_FK_NAMES) as batch_op:
            batch_op.drop_constraint("fk_request_logs_key_id_api_keys", type_="foreignkey")
            batch_op.drop_constraint("fk_request_logs_channel_id_channels", type_="foreignkey")
        with op.batch_alter_table("reservations", recreate="always",
                                  naming_convention=SQLITE_FK_NAMES) as batch_op:
            batch_op.drop_constraint("fk_reservations_key_id_api_keys", type_="foreignkey")
    else:
        for table in ("request_logs", "reservations"):
            for name in _foreign_keys(bind, table):
                op.drop_constraint(name, table, type_="foreignkey")


def downgrade():
    with op.batch_alter_table("model_prices", schema=None) as batch_op:
        for name in ("cache_write_micro", "per_image_micro", "per_second_micro"):
            batch_op.drop_column(name)
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_lease_until"))
        for name in ("lease_until", "is_stream") + tuple(n for n, _ in HOLD_COLUMNS) \
                + HOLD_COUNTERS:
            batch_op.drop_column(name)
