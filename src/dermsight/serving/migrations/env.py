"""Alembic environment: the app passes its connection in `config.attributes["connection"]`
(see storage.database.upgrade_database); `alembic` on the command line uses sqlalchemy.url."""

from alembic import context
from sqlalchemy import create_engine

from dermsight.serving.storage.models import Base


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    with create_engine(context.config.get_main_option("sqlalchemy.url")).begin() as own:
        run(own)
