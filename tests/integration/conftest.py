"""Fixtures shared by the integration tests of the authorization server."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def http(app, unique) -> TestClient:
    """A fresh browser: its own cookie jar and client address, no Authorization header,
    redirects not followed."""
    return TestClient(
        app, base_url="http://testserver", follow_redirects=False, client=(f"ip-{unique[:8]}", 1)
    )


@pytest.fixture
def auth(app):
    """The authorization server of the session app."""
    return app.state.auth
