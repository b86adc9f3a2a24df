"""``python -m dicom_gateway.keygen``: the gateway's signing key for SMART Backend Services.

Writes a private RS384 JSON Web Key (``--private-key``, mode 0600; what ``MSO_DICOM_PRIVATE_KEY``
points at) and its public JSON Web Key Set (``--public-jwks``, what ``mso client create
--jwks-file`` registers). Idempotent: an existing private key is kept and its public set written
again, so a container that runs it at every start keeps the key the server knows
(https://hl7.org/fhir/smart-app-launch/backend-services.html, registering a client's keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

from joserfc.jwk import RSAKey

from dicom_gateway.fhir_client import load_key


def ensure_key(private: Path, public: Path) -> bool:
    """Create the private key at ``private`` unless it exists, then write its public JWKS to
    ``public``; whether a new key was made."""
    created = not private.exists()
    if created:
        key = RSAKey.generate_key(
            2048, parameters={"kid": f"gateway-{uuid.uuid4().hex[:12]}", "alg": "RS384"}
        )
        private.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            json.dump(key.as_dict(private=True), out)
    key = RSAKey.import_key(load_key(private))
    public.parent.mkdir(parents=True, exist_ok=True)
    public.write_text(json.dumps({"keys": [key.as_dict(private=False)]}), encoding="utf-8")
    return created


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dicom_gateway.keygen``."""
    parser = argparse.ArgumentParser(
        prog="python -m dicom_gateway.keygen",
        description="Create the gateway's private signing key (kept if it exists) and write "
        "its public JWKS for `mso client create --jwks-file`.",
    )
    parser.add_argument("--private-key", type=Path, required=True, help="private JWK file")
    parser.add_argument("--public-jwks", type=Path, required=True, help="public JWKS file")
    args = parser.parse_args(argv)
    created = ensure_key(args.private_key, args.public_jwks)
    state = "created" if created else "kept"
    print(f"private key {state}: {args.private_key}; public JWKS: {args.public_jwks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
