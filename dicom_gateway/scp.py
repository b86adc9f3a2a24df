"""The gateway's DICOM SCP: an Application Entity accepting associations (PS3.8 Part 8, Upper
Layer; PS3.7 Annex D, association negotiation) for Verification and every Storage SOP Class
(PS3.4 Annex A and B), in the transfer syntaxes modalities and PACS actually send.

Calling AE titles outside ``allowed_aes`` are rejected during negotiation with A-ASSOCIATE-RJ
result "rejected-permanent", source "DICOM UL service-user", reason "calling-AE-title-not-
recognized" (PS3.8 9.3.4). Datasets are stored in the transfer syntax negotiated: the gateway
never decodes nor transcodes one.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway.config import GatewaySettings
from dicom_gateway.handlers import Fallback, event_handlers
from dicom_gateway.spool import Spool

# The acceptor's order decides which of a context's proposed syntaxes wins (PS3.8 9.3.3.2):
# compressed ones first, so a file the peer holds compressed travels and is stored as it is.
TRANSFER_SYNTAXES = [
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
MAX_ASSOCIATIONS = 64  # concurrent peers; pynetdicom's default of 10 is small for a hospital


def build_ae(settings: GatewaySettings) -> AE:
    """The gateway's Application Entity, configured from ``settings`` (not started)."""
    ae = AE(ae_title=settings.aet)
    ae.maximum_pdu_size = settings.max_pdu
    ae.require_calling_aet = sorted(settings.allowed)
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def start_scp(
    ae: AE, settings: GatewaySettings, spool: Spool, fallback: Fallback | None = None
) -> ThreadedAssociationServer:
    """Start listening on ``settings.host:settings.port`` in background threads; instances the
    spool cannot take go to ``fallback``."""
    handlers = event_handlers(spool, fallback)
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    if server is None:  # only a blocking start returns None
        raise RuntimeError("the DICOM server did not start")
    return server
