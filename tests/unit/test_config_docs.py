"""The README's configuration table and :class:`fhir_server.config.Settings` name the same
settings: every field has a row ``MSO_<NAME>``, every ``MSO_`` variable of the table is a field."""

from __future__ import annotations

import re
from pathlib import Path

from fhir_server.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_variables() -> set[str]:
    """The ``MSO_*`` names in the first column of the table under ``## Configuration``."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `MSO_"):
            first_cell = line.split("|")[1]
            names |= set(re.findall(r"`(MSO_[A-Z0-9_]+)`", first_cell))
    return names


def test_every_setting_has_a_row_and_every_row_a_setting() -> None:
    fields = {f"MSO_{name.upper()}" for name in Settings.model_fields}
    documented = documented_variables()
    assert documented, "no configuration table found in README.md"
    assert sorted(fields - documented) == [], "settings missing from the README table"
    assert sorted(documented - fields) == [], "README rows naming no setting"


def test_the_table_states_the_code_defaults_of_plain_values() -> None:
    """A row's default cell lists the field defaults, in the order of its variables."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if not line.startswith("| `MSO_"):
            continue
        cells = line.split("|")
        names = re.findall(r"`MSO_([A-Z0-9_]+)`", cells[1])
        defaults = re.findall(r"`([^`]*)`", cells[2])
        if len(defaults) != len(names):
            continue  # described in words (derived, unset …)
        for name, shown in zip(names, defaults, strict=True):
            value = Settings.model_fields[name.lower()].default
            if value is None:
                continue  # unset: the cell says what applies then
            if isinstance(value, bool):
                expected = "true" if value else "false"
            elif isinstance(value, float) and value.is_integer():
                expected = str(int(value))
            else:
                expected = str(value)
            assert shown.lstrip("./") == expected.lstrip("./"), (name, shown, expected)


def test_the_gateway_table_names_every_gateway_setting() -> None:
    """The flag table under ``### The DICOM gateway`` and :class:`GatewaySettings` agree: each
    field has its ``MSO_DICOM_*`` variable and its ``--flag``, each variable is a field."""
    from dicom_gateway.config import GatewaySettings

    text = README.read_text(encoding="utf-8")
    section = text.split("\n### The DICOM gateway\n", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `--")]
    variables = {v for row in rows for v in re.findall(r"`(MSO_DICOM_[A-Z0-9_]+)`", row[2])}
    flags = {f for row in rows for f in re.findall(r"`(--[a-z-]+)`", row[1])}
    fields = set(GatewaySettings.model_fields)
    assert variables == {f"MSO_DICOM_{name.upper()}" for name in fields}
    assert {f"--{name.replace('_', '-')}" for name in fields} <= flags
