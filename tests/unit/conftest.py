"""Store fixtures shared by the store tests: an empty store on SQLite, and on
PostgreSQL when XMPP_HA_TEST_PG_URL points at a server (.ci/run starts one)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from xmpp_ha.store import schema
from xmpp_ha.store.sql import SQLStore, create_engine, normalize_url

PG_URL = os.environ.get("XMPP_HA_TEST_PG_URL")


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL server, dropped after the module."""
    if not PG_URL:
        pytest.skip("XMPP_HA_TEST_PG_URL is not set")
    server = make_url(normalize_url(PG_URL))
    name = f"xmpp_ha_test_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        engine = create_async_engine(server, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql(statement)
        finally:
            await engine.dispose()

    def run(statement: str) -> None:
        # Its own thread and loop: this fixture is first needed inside a running loop.
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, admin(statement)).result()

    run(f'CREATE DATABASE "{name}"')
    yield server.set(database=name).render_as_string(hide_password=False)
    run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store: a new SQLite file, or the module's database with no tables."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    database: str = request.getfixturevalue("pg_database")
    engine = create_engine(database)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(schema.metadata.drop_all)
    finally:
        await engine.dispose()
    return database


@pytest.fixture
async def store(url: str) -> AsyncIterator[SQLStore]:
    """A session store with the current schema on the empty store."""
    opened = await SQLStore.open(url, create=True)
    yield opened
    await opened.close()
