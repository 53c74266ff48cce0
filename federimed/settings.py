"""One configuration model per deployed component.

Every setting is an environment variable with the ``FEDERIMED_`` prefix; the same names are
used by ``compose.yaml``, the Kubernetes manifests and the ``federimed`` CLI, so a value means
the same thing wherever it is set.  Values are validated when a component starts, so a typo in
a deployment fails at once with the variable's name instead of deep inside Flower.  That
includes numbers: a port is 1..65535 (also the one in a HOST:PORT address), counts are not
negative, and a host name is a host name (it is written into Flower's arguments and Caddy's
configuration, so a stray space, quote or brace is refused rather than passed on).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Isolation = Literal["subprocess", "process"]
MiB = 1024 * 1024
# A DNS name, an IPv4 address, or an IPv6 address (bare, or in brackets as in "[::1]:8000").
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+")


def _host(value: str) -> str:
    if not _HOST.fullmatch(value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


def _address(value: str) -> str:
    """HOST:PORT, with a port in 1..65535: Flower would only fail on it at its first connect."""
    host, colon, port = value.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    _host(host)
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return value


def _node_config_path(value: Path) -> Path:
    """Flower's --node-config is a quoted string: a quote or line break would end it early."""
    if any(char in str(value) for char in '"\\\n\r\x00'):
        raise ValueError(f"{str(value)!r}: no quote, backslash, line break or NUL allowed here")
    return value


Host = Annotated[str, AfterValidator(_host)]
Address = Annotated[str, AfterValidator(_address)]


class SuperLinkSettings(BaseSettings):
    """The consortium's SuperLink (Fleet, Control and Runtime APIs on one HTTPS port)."""

    model_config = SettingsConfigDict(env_prefix="FEDERIMED_SUPERLINK_", extra="forbid")

    host: Host = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(8000, ge=1, le=65535, description="The single HTTPS port.")
    ca_cert: Path = Field(Path("certs/ca.crt"), description="CA that signed the server cert.")
    cert: Path = Field(Path("certs/superlink.crt"), description="Server certificate (PEM).")
    key: Path = Field(Path("certs/superlink.key"), description="Server private key (PEM).")
    database: Path = Field(Path("state/superlink.db"), description="SQLite state file.")
    node_auth: bool = Field(True, description="Only enrolled SuperNodes may connect.")
    isolation: Isolation = Field(
        "subprocess", description="'process' when a separate superexec container runs apps."
    )
    superexec_auth_secret: Path | None = Field(
        None, description="Shared secret file a separate ServerApp runner must present."
    )


class SuperNodeSettings(BaseSettings):
    """One hospital's SuperNode: connects out to the SuperLink, never accepts inbound traffic."""

    model_config = SettingsConfigDict(env_prefix="FEDERIMED_NODE_", extra="forbid")

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Hospital id.")
    superlink: Address = Field("127.0.0.1:8000", description="SuperLink address HOST:PORT.")
    ca_cert: Path = Field(Path("certs/ca.crt"), description="CA used to verify the SuperLink.")
    private_key: Path = Field(..., description="The node's ECDSA P-384 key (OpenSSH format).")
    data_path: Annotated[Path, AfterValidator(_node_config_path)] = Field(
        ..., description="The hospital's data folder (read-only)."
    )
    isolation: Isolation = Field(
        "subprocess", description="'process' when a separate ClientApp container runs the app."
    )
    runtime_host: Host = Field("127.0.0.1", description="Bind address of the node's app API.")
    runtime_port: int = Field(9094, ge=1, le=65535, description="Port of the node's app API.")
    superexec_auth_secret: Path | None = Field(
        None, description="Shared secret file the hospital's ClientApp runner must present."
    )
    idle_poll_seconds: float = Field(
        1.0,
        gt=0,
        le=3,
        description="How long an idle node waits between two asks for work (Flower's fixed "
        "3 s otherwise): a round's task starts sooner, for one request per wait to the "
        "SuperLink.",
    )


class SuperExecSettings(BaseSettings):
    """An app runner (Flower process isolation): carries our code and its dependencies."""

    model_config = SettingsConfigDict(env_prefix="FEDERIMED_SUPEREXEC_", extra="forbid")

    runtime_api: Address = Field(..., description="SuperLink HOST:8000 or SuperNode HOST:9094.")
    ca_cert: Path | None = Field(
        None, description="CA to verify the Runtime API; unset means plaintext (same pod/host)."
    )
    auth_secret: Path | None = Field(
        None, description="Shared secret file the SuperLink / SuperNode expects from runners."
    )
    warm_start: bool = Field(
        True,
        description="Fork each ClientApp task from a parent that has torch, transformers and "
        "peft imported (about 1 s to start instead of 10); costs one idle process per runner. "
        "Off for ServerApp runners, which start one app per run.",
    )


class GatewaySettings(BaseSettings):
    """The fleet gateway: the only door hospitals have into the consortium (Fleet API only)."""

    model_config = SettingsConfigDict(env_prefix="FEDERIMED_GATEWAY_", extra="forbid")

    host: Host = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(8443, ge=1, le=65535, description="HTTPS port hospitals connect to.")
    superlink: Address = Field("127.0.0.1:8000", description="The SuperLink behind it, HOST:PORT.")
    superlink_name: Host = Field(
        "superlink", description="Name in the SuperLink's certificate (verified on every hop)."
    )
    ca_cert: Path = Field(Path("certs/ca.crt"), description="CA that signed both certificates.")
    cert: Path = Field(Path("certs/gateway.crt"), description="Gateway certificate (PEM).")
    key: Path = Field(Path("certs/gateway.key"), description="Gateway private key (PEM).")
    state: Path = Field(Path("state/gateway"), description="Caddy's working folder.")
    max_body_bytes: int = Field(
        64 * MiB,
        ge=8 * MiB,
        le=2**31 - 1,
        description="Largest request body forwarded, in bytes; a larger one gets 413 (at once "
        "when its Content-Length says so). Flower sends a model as objects of at most 5 MiB "
        "(its array chunk size), one per request; at least 8 MiB.",
    )


class RuntimeSettings(BaseSettings):
    """Where and how the apps compute: the same code on a GPU host and on a laptop."""

    # An empty variable means the default: compose passes `FEDERIMED_TORCH_THREADS:` through
    # from the shell, empty when the shell set it empty.
    model_config = SettingsConfigDict(
        env_prefix="FEDERIMED_", extra="ignore", env_ignore_empty=True
    )

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA (with mixed precision) when present."
    )
    torch_threads: int = Field(
        0, ge=0, le=4096, description="CPU threads per process; 0 = torch default."
    )
    precision: Literal["auto", "fp32"] = Field(
        "auto",
        description="'auto': bf16 autocast on GPUs that support it (fp16 with loss scaling "
        "on older ones) and on CPUs that multiply bf16 in hardware (AMX or AVX512-BF16); "
        "float32 on other CPUs. 'fp32': full precision everywhere.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="The generative track: recompute activations in the backward pass instead "
        "of keeping them (less GPU memory for longer sequences, about a third more compute).",
    )
    feature_cache: Path | None = Field(
        None,
        description="A hospital-owned, writable folder where the frozen layers' output for its "
        "cases is kept between rounds (derived from the records: protect it like them); "
        "unset: recomputed in every round.",
    )


def _default_tokens() -> Path:
    """``$XDG_CONFIG_HOME/federimed/serve-tokens`` (``~/.config`` when unset): the person's own."""
    import os

    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "federimed" / "serve-tokens"


class ServeSettings(BaseSettings):
    """`federimed serve`: the clinician page, the JSON API and the operator dashboard.

    Access (docs/webapp-security.md): authenticated by default, by a token per person (only its
    hash is kept, in TOKENS) sent as ``Authorization: Bearer`` or exchanged on the login page for
    a signed session cookie; or, behind a hospital's single-sign-on proxy, by the proxy's user
    header from the proxy's own addresses only.  Lists are comma-separated."""

    model_config = SettingsConfigDict(env_prefix="FEDERIMED_SERVE_", extra="forbid")

    model: Path | None = Field(
        None,
        description="The model to query: a run's final/ folder, the demo's model/, or "
        "'latest' (the newest completed run's under RUNS, followed as runs complete).",
    )
    runs: Path | None = Field(
        None, description="Folder with run records (rounds.jsonl, summary.json), read-only."
    )
    host: Host = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(8080, ge=1, le=65535, description="HTTP port.")
    max_chars: int = Field(
        4000, ge=1, le=100_000, description="Longest case text or question accepted."
    )
    max_new_tokens: int = Field(
        64, ge=1, le=1024, description="Longest answer a generative model writes."
    )
    auth: Literal["token", "proxy-header", "none"] = Field(
        "token",
        description="'token': a person signs in with a token from TOKENS (Bearer header or "
        "the login page's session cookie); 'proxy-header': the user named in PROXY_USER_HEADER, "
        "believed only from TRUSTED_PROXIES (a hospital's single-sign-on proxy); 'none': "
        "anyone who reaches the port (only behind something else that authenticates).",
    )
    tokens: Path = Field(
        default_factory=_default_tokens,
        description="The users' tokens, one 'name:scrypt-hash' line each, never the tokens "
        "themselves (`federimed serve --add-token NAME` writes it, 0600); re-read when it "
        "changes. On a loopback address the first start creates it with a token for whoever "
        "started it.",
    )
    proxy_user_header: str = Field(
        "X-Forwarded-User",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="With auth=proxy-header: the header in which the proxy names the user.",
    )
    trusted_proxies: str = Field(
        "",
        description="Addresses or networks (CIDR) of the proxies whose user header and "
        "X-Forwarded-Proto are believed, comma-separated; required with auth=proxy-header.",
    )
    allowed_hosts: str = Field(
        "",
        description="Host names requests may be addressed to, besides localhost, 127.0.0.1, "
        "::1, HOST and any IP address, comma-separated ('*.example.org' for a domain); any "
        "other Host header gets 400 (DNS rebinding). '*' turns the check off.",
    )
    healthz: Literal["open", "auth"] = Field(
        "open", description="/healthz without credentials ('open') or only signed in ('auth')."
    )
    metrics: Literal["auth", "open", "off"] = Field(
        "auth",
        description="/metrics only with credentials ('auth', e.g. Prometheus' bearer token), "
        "to anyone who reaches the port ('open'), or not at all ('off').",
    )
    session_hours: float = Field(
        12, gt=0, le=24 * 30, description="How long a login page session lasts."
    )
    cookie_secure: Literal["auto", "always", "never"] = Field(
        "auto",
        description="The session cookie's Secure flag: 'auto' when the request came over "
        "HTTPS (directly, or X-Forwarded-Proto from a trusted proxy).",
    )
    audit_log: Path | None = Field(
        None,
        description="File that gets one JSON line per query (who, when, which model, outcome; "
        "never the text), created 0600; unset: the log (logger federimed.audit).",
    )
    max_body_bytes: int | None = Field(
        None,
        ge=1024,
        le=64 * MiB,
        description="Largest request body, refused with 413 before it is read (Content-Length) "
        "or as soon as more arrives; unset: 12 bytes per MAX_CHARS character + 4 KiB (JSON may "
        "escape a character to 12 bytes).",
    )
    max_generations: int = Field(
        2,
        ge=1,
        le=256,
        description="Answers of a generative model in progress at once (one computes, the rest "
        "wait their turn); one more gets 429 with Retry-After.",
    )
    max_predictions: int = Field(
        32,
        ge=1,
        le=4096,
        description="Classifier requests in progress at once (computing or queued); one more "
        "gets 429 with Retry-After.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for item in _items(value):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for item in _items(value):
            name = item[2:] if item.startswith("*.") else item
            if item != "*" and not _HOST.fullmatch(name):
                raise ValueError(f"{item!r} is not a host name ('*.domain' for a domain)")
        return value

    @model_validator(mode="after")
    def _proxy_needs_proxies(self) -> ServeSettings:
        if self.auth == "proxy-header" and not _items(self.trusted_proxies):
            raise ValueError(
                "auth=proxy-header needs FEDERIMED_SERVE_TRUSTED_PROXIES: the addresses of the "
                "proxy whose user header is believed (from anyone else it would be a forgery)"
            )
        return self


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class ExporterSettings(BaseSettings):
    """`federimed exporter`: a hospital's Prometheus metrics, read from its egress ledger."""

    model_config = SettingsConfigDict(env_prefix="FEDERIMED_EXPORTER_", extra="forbid")

    ledger: Path = Field(..., description="The hospital's egress ledger (read-only).")
    host: Host = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(9401, ge=1, le=65535, description="HTTP port of /metrics.")
