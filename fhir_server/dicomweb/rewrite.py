"""Rebase the URLs of DICOM JSON answers onto the bridge (DICOM PS3.18 F.2, the DICOM JSON
model: F.2.6 ``BulkDataURI``; attributes of VR UR such as Retrieve URL (0008,1190) in QIDO-RS
answers, PS3.18 10.6.3.3, and in STOW-RS answers, 10.5.3).

Orthanc writes its own address into those URLs; a viewer following them would then call
Orthanc directly, without the bridge's access checks (and fail). :func:`rebase_urls` replaces
the scheme, host and DICOMweb root of every such URL that points below Orthanc's DICOMweb root
with the bridge's public base, keeping the rest of the path. Pure: JSON values in, same out.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

BULK_DATA_URI = "BulkDataURI"


def rebase_urls(document: Any, origin_root: str, bridge_base: str) -> int:
    """Rewrite in place every URL in ``document`` (a DICOM JSON dataset or a list of them)
    whose path starts with ``origin_root`` (Orthanc's DICOMweb path, e.g. ``/dicom-web``) to
    ``bridge_base`` + the rest of the path; return how many were rewritten."""
    root = "/" + origin_root.strip("/")
    base = bridge_base.rstrip("/")
    datasets = document if isinstance(document, list) else [document]
    return sum(_dataset(d, root, base) for d in datasets if isinstance(d, dict))


def rebase(url: str, root: str, base: str) -> str | None:
    """``url`` moved from below ``root`` onto ``base``, or ``None`` when it is not below it."""
    parts = urlsplit(url)
    path = parts.path
    if path != root and not path.startswith(root + "/"):
        return None
    moved = base + path[len(root) :]
    return f"{moved}?{parts.query}" if parts.query else moved


def _dataset(dataset: dict[str, Any], root: str, base: str) -> int:
    count = 0
    for attribute in dataset.values():
        if not isinstance(attribute, dict):
            continue
        uri = attribute.get(BULK_DATA_URI)
        if isinstance(uri, str):
            moved = rebase(uri, root, base)
            if moved is not None:
                attribute[BULK_DATA_URI] = moved
                count += 1
        vr, values = attribute.get("vr"), attribute.get("Value")
        if not isinstance(values, list):
            continue
        if vr == "UR":
            for index, value in enumerate(values):
                moved = rebase(value, root, base) if isinstance(value, str) else None
                if moved is not None:
                    values[index] = moved
                    count += 1
        elif vr == "SQ":
            count += sum(_dataset(item, root, base) for item in values if isinstance(item, dict))
    return count
