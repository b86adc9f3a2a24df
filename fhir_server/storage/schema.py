"""Every table of the store on one ``metadata`` (the same schema on SQLite and PostgreSQL).

An aggregator that only imports downward: the tables live in their modules
(:mod:`.resource_schema` the resources, their history and blobs; :mod:`.index_schema` the search
index; :mod:`.access_schema` the access policy's memberships; :mod:`.auth_schema`,
:mod:`.audit_schema`, :mod:`.messaging_schema`, :mod:`.bulk_schema`), each on
:mod:`.base_schema`'s ``metadata``.
Importing this module registers them all (Alembic and ``create_all`` need every table).
"""

from __future__ import annotations

from fhir_server.storage import access_schema as _access_schema  # noqa: F401
from fhir_server.storage import audit_schema as _audit_schema  # noqa: F401
from fhir_server.storage import auth_schema as _auth_schema  # noqa: F401
from fhir_server.storage import bulk_schema as _bulk_schema  # noqa: F401
from fhir_server.storage import chat_schema as _chat_schema  # noqa: F401
from fhir_server.storage import dicomweb_schema as _dicomweb_schema  # noqa: F401
from fhir_server.storage import feed_schema as _feed_schema  # noqa: F401
from fhir_server.storage import index_schema as _index_schema  # noqa: F401
from fhir_server.storage import messaging_schema as _messaging_schema  # noqa: F401
from fhir_server.storage import subscription_schema as _subscription_schema  # noqa: F401
from fhir_server.storage.base_schema import PidType, metadata
from fhir_server.storage.resource_schema import binary_content, resource, resource_history

__all__ = ["PidType", "binary_content", "metadata", "resource", "resource_history"]
