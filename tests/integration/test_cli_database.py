"""``mso`` and its database: ``--database-url`` before or after the sub-command, the database
named on stderr (password hidden), and commands that only use a database never create one."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from fhir_server.cli import database_label, main
from tests.conftest import _create_pg_database, _drop_pg_database, _pg_available
from tests.required_tools import missing_tool

# Commands that only read or change what exists: none of them may create a database.
READ_ONLY = [
    ["user", "list"],
    ["user", "disable", "--username", "nobody"],
    ["user", "enable", "--username", "nobody"],
    ["client", "list"],
    ["client", "disable", "--id", "nobody"],
    ["launch", "create", "--patient", "p1"],
    ["token", "issue", "--client-id", "demo-viewer"],
    ["reindex"],
    ["outbox", "status"],
]


@pytest.mark.parametrize("argv", READ_ONLY, ids=lambda argv: " ".join(argv[:2]))
def test_read_only_commands_refuse_a_missing_sqlite_file(tmp_path: Path, argv, capsys) -> None:
    path = tmp_path / "nowhere" / "mso.db"
    assert main(["--database-url", f"sqlite:///{path}", *argv]) == 2
    err = capsys.readouterr().err
    assert f"mso: database sqlite:///{path} ({path})" in err
    assert f"no database at {path}" in err
    assert "mso migrate" in err and "mso seed-demo" in err
    assert not path.parent.exists()


def test_read_only_command_refuses_a_postgres_database_without_schema(capsys) -> None:
    if reason := _pg_available():
        missing_tool(reason)
    name, url = _create_pg_database()
    try:
        assert main(["user", "list", "--database-url", url]) == 2
        assert "holds no MSO schema" in capsys.readouterr().err
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                assert inspect(conn).get_table_names() == []  # nothing migrated
        finally:
            engine.dispose()
    finally:
        _drop_pg_database(name)


def test_database_url_before_and_after_the_sub_command(fresh_db_url, tmp_path, capsys) -> None:
    for argv in (
        ["--database-url", fresh_db_url, "client", "list"],
        ["client", "list", "--database-url", fresh_db_url],
        # after wins over before; before stays when none is given after
        ["--database-url", f"sqlite:///{tmp_path / 'other.db'}", "client", "list",
         "--database-url", fresh_db_url],
    ):  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        out, err = capsys.readouterr()
        assert out.startswith("CLIENT ID")
        assert f"mso: database {database_label(fresh_db_url)}" in err
    assert not (tmp_path / "other.db").exists()


def test_setup_commands_create_the_database(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "new" / "mso.db"
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-enough-password\n"))
    argv = ["user", "create", "--username", "first-admin", "--password-stdin", "--role", "admin"]
    assert main([*argv, "--database-url", f"sqlite:///{path}"]) == 0, capsys.readouterr()
    assert path.is_file()
    assert main(["user", "list", "--database-url", f"sqlite:///{path}"]) == 0
    assert "first-admin" in capsys.readouterr().out


def test_password_is_hidden_in_the_database_line() -> None:
    label = database_label("postgresql+psycopg://mso:s3cret@db.example.org:5432/mso")
    assert "s3cret" not in label and label.startswith("postgresql+psycopg://mso:***@")


def test_mso_in_another_folder_says_where_and_creates_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSO_")}
    result = subprocess.run(
        [sys.executable, "-m", "fhir_server.cli", "token", "issue", "--client-id", "demo-viewer"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = tmp_path.resolve() / "data" / "mso.db"
    assert result.returncode == 2, result.stderr
    assert f"mso: database sqlite:///./data/mso.db ({expected})" in result.stderr
    assert f"no database at {expected}" in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []
