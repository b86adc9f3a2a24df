"""Composition of the storage layer: a :class:`Repository` built from :class:`Settings`.

The one place that knows how a repository is assembled (engine, search registry, hooks with
the change feed, validator, access policy). The application factory
(:func:`fhir_server.app.create_app`), the command line and
:func:`fhir_server.conformance.load_conformance` all call :func:`build_repository`, so none of
them needs to import the application (which imports the workflow, which reads the conformance
files: the cycle this module breaks).
"""

from __future__ import annotations

from fhir_server.auth.policy import AccessPolicy
from fhir_server.config import Settings
from fhir_server.fhir.validation import validate_resource
from fhir_server.hooks import Hooks
from fhir_server.search.registry import SearchRegistry
from fhir_server.storage import change_feed
from fhir_server.storage.engine import build_engine
from fhir_server.storage.repository import Repository


def build_repository(settings: Settings) -> Repository:
    """The repository over the configured database, with validation and search registry."""
    engine = build_engine(settings.database_url, pool_size=settings.db_pool_size)
    registry = SearchRegistry.load()
    hooks = Hooks()
    change_feed.register(hooks)  # every write of every process, whoever else listens
    return Repository(
        engine,
        registry=registry,
        hooks=hooks,
        validator=validate_resource,
        policy=AccessPolicy(registry),
    )
