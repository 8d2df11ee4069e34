"""reservations: drop the secondary indexes on user_id, created_at and lease_until

Every request inserts one hold row and deletes it again, so each index on the table costs two
index-page writes a request (6 of the ~26 pages the two commits of a request write, 2-3% of a
worker's CPU). The table holds only the requests in flight: the sweeper, the billing check and
a user's deletion scan it whole faster than they would keep the indexes up to date.

Revision ID: 0005_hold_indexes
Revises: 0004_console
"""
from alembic import op


revision = "0005_hold_indexes"
down_revision = "0004_console"  # ... -> 0004_console -> 0005_hold_indexes
branch_labels = None
depends_on = None

INDEXES = (("ix_reservations_user_id", "user_id"), ("ix_reservations_created_at", "created_at"),
           ("ix_reservations_lease_until", "lease_until"))


def upgrade():
    with op.batch_alter_table("reservations") as batch:
        for name, _column in INDEXES:
            batch.drop_index(name)


def downgrade():
    with op.batch_alter_table("reservations") as batch:
        for name, column in INDEXES:
            batch.create_index(name, [column], unique=False)
