"""A database error names the statement, never its values: a resource's JSON (patient data)
would otherwise reach the logs through the traceback of an unhandled error."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from fhir_server.storage.engine import build_engine


def test_database_errors_do_not_quote_the_values(db_url: str) -> None:
    engine = build_engine(db_url, pool_size=1)
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
            conn.execute(text("SELECT * FROM no_such_table WHERE x = :v"), {"v": "SECRET-NAME"})
        assert "SECRET-NAME" not in str(caught.value)
    finally:
        engine.dispose()
