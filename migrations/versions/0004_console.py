"""console: channel test results, revoked redemption codes

Revision ID: 0004_console
Revises: 0002_money
"""
from alembic import op
import sqlalchemy as sa


revision = "0004_console"
down_revision = "0003_limits"  # 0001 -> 0002_money -> 0003_limits -> 0004_console
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("channels") as batch:
        batch.add_column(sa.Column("last_test_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("last_test_ok", sa.Boolean(), nullable=True))
    with op.batch_alter_table("redemption_codes") as batch:
        batch.add_column(sa.Column("revoked_at", sa.DateTime(), nullable=True))


def downgrade():
    with op.batch_alter_table("redemption_codes") as batch:
        batch.drop_column("revoked_at")
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("last_test_ok")
        batch.drop_column("last_test_at")
