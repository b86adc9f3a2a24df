"""The HTTP shell of the DICOMweb bridge (DICOM PS3.18 10.4 WADO-RS, 10.5 STOW-RS, 10.6 QIDO-RS):
one route for every path below ``/dicomweb``, handed to :class:`.bridge.DicomwebBridge`."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from fhir_server.dicomweb.bridge import DicomwebBridge
from fhir_server.interactions.capabilities import DICOMWEB_PATH


def build_router(bridge: DicomwebBridge) -> APIRouter:
    """The router serving ``bridge`` at ``/dicomweb``."""
    router = APIRouter()

    @router.api_route(
        DICOMWEB_PATH + "/{path:path}", methods=["GET", "HEAD", "POST"], include_in_schema=False
    )
    async def dicomweb(request: Request, path: str) -> Response:
        """Any DICOMweb request (see :mod:`fhir_server.dicomweb.paths`)."""
        return await bridge.handle(request, path)

    return router
