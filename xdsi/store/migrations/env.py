"""Alembic environment: migrate the connection that xdsi.store.migrations gives.

Alembic runs this file for every command; xdsi.store.migrations.config puts
the connection in the configuration's attributes.
"""

from __future__ import annotations

from alembic import context

from xdsi.store.schema import metadata

# Limitation: no offline mode; `alembic upgrade --sql` cannot write a script,
# migrations run on a live connection only.
connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters a table by copying it, which batch operations do.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
