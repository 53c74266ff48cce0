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

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field
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
        "on older ones); 'fp32': full precision everywhere. CPUs always compute in fp32.",
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


class ServeSettings(BaseSettings):
    """`federimed serve`: the clinician page, the JSON API and the operator dashboard."""

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


class ExporterSettings(BaseSettings):
    """`federimed exporter`: a hospital's Prometheus metrics, read from its egress ledger."""

    model_config = SettingsConfigDict(env_prefix="FEDERIMED_EXPORTER_", extra="forbid")

    ledger: Path = Field(..., description="The hospital's egress ledger (read-only).")
    host: Host = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(9401, ge=1, le=65535, description="HTTP port of /metrics.")
