"""Alembic environment of the corrections store: always run in-process by `training.store` on a
connection it passes in `config.attributes["connection"]` (no alembic.ini, no URL here)."""

from __future__ import annotations

from alembic import context

VERSION_TABLE = "osprey_alembic_version"  # not alembic_version: the database may be shared with other apps

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through training.store.Store (it passes the connection)")

context.configure(
    connection=connection,
    target_metadata=None,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
