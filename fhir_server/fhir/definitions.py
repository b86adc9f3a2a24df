"""The official FHIR R4 4.0.1 definition files shipped inside the package.

They are copies of HL7's files from ``shared/fhir-r4`` (see ``fhir/r4/README.md``); this module
only finds and loads them, once per process.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson

R4_DIR = Path(__file__).with_name("r4")
FHIR_VERSION = "4.0.1"


def load_json(name: str) -> Any:
    """Load one packaged definition file by file name."""
    return orjson.loads((R4_DIR / name).read_bytes())


@cache
def resource_types() -> frozenset[str]:
    """Every concrete R4 resource type (147 names, from the R4 StructureDefinitions)."""
    return frozenset(load_json("resource-types.json"))


def is_resource_type(name: str) -> bool:
    """True when ``name`` is a concrete R4 resource type."""
    return name in resource_types()
