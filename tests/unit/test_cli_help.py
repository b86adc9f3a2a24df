"""Every option of every ``mso`` command has help text, and sub-commands do not share theirs."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from fhir_server.cli import build_parser


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """(command words, parser, its one-line help) of every sub-command, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                yield (*path, name), child, helps.get(name)
                yield from commands(child, (*path, name))


def test_every_option_has_help() -> None:
    missing = [
        (" ".join(path), action.option_strings[0])
        for path, parser, _ in commands(build_parser())
        for action in parser._actions
        if action.option_strings and action.help in (None, "")
    ]
    assert missing == []


def test_every_command_has_its_own_help() -> None:
    found = {" ".join(path): text for path, _, text in commands(build_parser())}
    assert all(found.values()), [name for name, text in found.items() if not text]
    assert found["user enable"] != found["user disable"]
    assert "enable" in found["user enable"] and "disable" in found["user disable"]
    for name in ("serve", "migrate", "user create", "launch create", "token issue", "reindex"):
        assert name in found
    assert "outbox status" in found


def test_database_url_is_accepted_after_every_command() -> None:
    parser = build_parser()
    for path, child, _ in commands(parser):
        if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
            continue
        assert any("--database-url" in a.option_strings for a in child._actions), path
