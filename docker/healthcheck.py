"""Container healthcheck (stdlib only): exit 0 when the component answers.

    healthcheck.py https://localhost:8000/health   # SuperLink
    healthcheck.py https://localhost:8443/health   # fleet gateway (forwards /health to the
                                                   # SuperLink: the hospitals' whole path)
    healthcheck.py tcp://127.0.0.1:9094            # SuperNode runtime API is listening

HTTPS: the server certificate is verified with the CA file of HEALTHCHECK_CA_CERT, else the
image's own CA setting (FEDERIMED_SUPERLINK_CA_CERT, FEDERIMED_GATEWAY_CA_CERT), for the name
in the URL (`localhost`, sent as SNI; both certificates carry it).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.request
from urllib.parse import urlsplit

CA_SETTINGS = ("HEALTHCHECK_CA_CERT", "FEDERIMED_SUPERLINK_CA_CERT", "FEDERIMED_GATEWAY_CA_CERT")


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else "https://localhost:8000/health"
    url = urlsplit(target)
    try:
        if url.scheme == "tcp":
            with socket.create_connection((url.hostname, url.port), timeout=3):
                return 0
        ca = next((os.environ[k] for k in CA_SETTINGS if os.environ.get(k)), None)
        ctx = ssl.create_default_context(cafile=ca) if url.scheme == "https" else None
        with urllib.request.urlopen(target, context=ctx, timeout=3) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # any failure means unhealthy; say why in `docker inspect`
        print(f"unhealthy: {target}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
