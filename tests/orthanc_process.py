"""A real Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb`` packages) for the imaging tests.

The launcher lives in :mod:`bench.orthanc` (the imaging benchmark starts Orthancs too):
:func:`start_orthanc` writes a configuration into a temporary folder, starts ``Orthanc`` on free
loopback ports with the DICOMweb plugin, and waits until its REST API answers. Tests that need it
call :func:`require_orthanc` first: without the packages (or ``storescu`` from dcmtk) they skip
with the reason; CI installs them and fails rather than skips (``MSO_TEST_REQUIRE_TOOLS``).
"""

from __future__ import annotations

from bench.orthanc import Orthanc, missing_imaging_tools, start_orthanc
from tests.required_tools import missing_tool

__all__ = ["Orthanc", "missing_imaging_tools", "require_orthanc", "start_orthanc"]


def require_orthanc() -> None:
    """Skip the calling test with the reason when the imaging tools are missing (fail in CI:
    :func:`tests.required_tools.missing_tool`)."""
    reason = missing_imaging_tools()
    if reason:
        missing_tool(reason)
