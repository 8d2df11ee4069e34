"""Migrations and models agree: `make run` upgrades to exactly the schema the code uses."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from cli.setup import upgrade_database
from tests.support import drop_postgres_database, postgres_database_url


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/migrated.db"
        return
    name = f"tokenopen_migrations_{id(request)}"
    yield postgres_database_url(name)
    drop_postgres_database(name)


def test_migrations_build_the_models_schema(migrated_url):
    from app import create_app
    from extensions import db
    app = create_app({"SQLALCHEMY_DATABASE_URI": migrated_url, "SECRET_KEY": "test"})
    with app.app_context():
        upgrade_database()
        upgrade_database()  # idempotent: a second start changes nothing
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
        db.engine.dispose()
    assert diff == [], f"models.py and migrations differ; run `make migration`: {diff}"
