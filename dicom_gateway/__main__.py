"""``python -m dicom_gateway`` (also ``mso dicom-gateway``): run the DICOM gateway.

Every :class:`~dicom_gateway.config.GatewaySettings` field is a flag (``allowed_aes`` is
``--allowed-aes``) and an ``MSO_DICOM_*`` environment variable; a flag wins over the
environment. Runs until SIGTERM or SIGINT, then stops cleanly with exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from dicom_gateway.config import GatewaySettings
from dicom_gateway.gateway import run

ENV_PREFIX = "MSO_DICOM_"


def flag_of(field_name: str) -> str:
    """The command-line flag of a settings field."""
    return "--" + field_name.replace("_", "-")


def build_parser(prog: str = "python -m dicom_gateway") -> argparse.ArgumentParser:
    """One flag per settings field, its help naming the variable and the default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="DICOM gateway: a C-STORE SCP that spools durably and forwards to Orthanc "
        "(and keeps FHIR ImagingStudy resources in step when --fhir-base-url is set)",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in GatewaySettings.model_fields.items():
        default = field.default
        shown = {None: "unset", "": "empty"}.get(default, default)
        secret = "password" in name
        parser.add_argument(
            flag_of(name),
            dest=name,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} (env {ENV_PREFIX}{name.upper()}"
            + ("" if secret else f"; default: {shown}")
            + ")",
        )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the lines written to stderr (default: INFO)",
    )
    return parser


def parse_settings(argv: list[str] | None = None) -> tuple[GatewaySettings, str]:
    """The settings (flags over environment over defaults) and the log level."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    level = args.pop("log_level", "INFO")
    try:
        return GatewaySettings(**args), level
    except ValidationError as exc:
        problems = "; ".join(
            f"{flag_of(str(e['loc'][0])) if e['loc'] else ''} {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)


def main(argv: list[str] | None = None) -> int:
    """Parse flags over the environment and run the gateway until signalled."""
    settings, level = parse_settings(argv)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet = max(logging.WARNING, logging.getLevelName(level))
    logging.getLogger("pynetdicom").setLevel(quiet)  # a line per association and message
    # a line per connection retry while Orthanc is down: the forwarders log the outage once
    logging.getLogger("urllib3.connectionpool").setLevel(max(logging.ERROR, quiet))
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
