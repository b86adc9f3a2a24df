"""``python -m fhir_server.bulk``: an export worker process (like ``mso worker``)."""

import sys

from fhir_server.bulk.worker import main

sys.exit(main())
