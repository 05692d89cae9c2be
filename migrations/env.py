"""Alembic environment: the URL comes from emo's settings unless the caller passes one."""

from __future__ import annotations

from alembic import context

from db.engine import make_engine
from db.models import Base
from emo.settings import get_settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url


def run_offline() -> None:
    """Emit SQL to stdout (``--sql``) without a connection."""
    context.configure(
        url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run against the database; batch mode lets SQLite alter tables."""
    engine = make_engine(url, sqlite_foreign_keys=False)  # see make_engine
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=True,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
