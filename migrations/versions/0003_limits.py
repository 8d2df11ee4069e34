"""concurrency limits on groups and keys

Revision ID: 0003_limits
Revises: 0002_money
"""
from alembic import op
import sqlalchemy as sa

revision = "0003_limits"
down_revision = "0002_money"  # re-chained after merging main (was "0001")
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("groups") as batch_op:
        batch_op.add_column(sa.Column("concurrency", sa.Integer(), nullable=False,
                                      server_default="0"))
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("concurrency", sa.Integer(), nullable=False,
                                      server_default="0"))


def downgrade():
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_column("concurrency")
    with op.batch_alter_table("groups") as batch_op:
        batch_op.drop_column("concurrency")
