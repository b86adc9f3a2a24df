"""Tests that need a tool this machine may lack (Orthanc, dcmtk, a compose validator, a
PostgreSQL server) skip with the reason locally; CI sets ``MSO_TEST_REQUIRE_TOOLS=1`` (in
``.ci/run``, which installs them all), and there a missing tool fails the test instead, so
nothing skips in CI unnoticed."""

from __future__ import annotations

import os

import pytest


def missing_tool(reason: str) -> None:
    """Skip the calling test with ``reason``, or fail it where every tool is required."""
    if os.environ.get("MSO_TEST_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason} (MSO_TEST_REQUIRE_TOOLS=1: CI must install it)")
    pytest.skip(reason)
