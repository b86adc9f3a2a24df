"""``mso reindex``: rows removed behind the server's back come back (search.html)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete

from fhir_server.cli_reindex import reindex
from fhir_server.storage.engine import WRITE_OPTION, build_engine
from fhir_server.storage.index_schema import INDEX_TABLES
from tests.conftest import make_settings


def test_reindex_restores_rows(client, db_url: str, unique: str, tmp_path: Path) -> None:
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:reindex", "value": unique}]}
    assert client.post("/fhir/Patient", json=body).status_code == 201
    query = f"/fhir/Patient?identifier=urn:reindex|{unique}"
    assert len(client.get(query).json().get("entry", [])) == 1
    engine = build_engine(db_url)
    # BEGIN IMMEDIATE on SQLite: a read that turns into a write gets "database is locked" at
    # once (no busy wait) while the audit writer thread holds the write lock
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
        pid = conn.exec_driver_sql(
            "SELECT pid FROM resource WHERE res_type = 'Patient' ORDER BY pid DESC LIMIT 1"
        ).scalar()
        for table in INDEX_TABLES:
            conn.execute(delete(table).where(table.c.pid == pid))
    engine.dispose()
    assert client.get(query).json().get("entry", []) == []
    assert reindex(make_settings(db_url, tmp_path), "Patient") >= 1
    assert len(client.get(query).json().get("entry", [])) == 1
