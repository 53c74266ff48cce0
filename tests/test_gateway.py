"""The fleet gateway (real Caddy from ``gateway_argv``) in front of a real TLS SuperLink.

Hospitals are given the gateway's address only, so it is the whole boundary between them and
the SuperLink's Control and Runtime APIs (same port as Fleet in Flower 1.42).  Each request is
sent with ``http.client``'s raw ``putrequest``, so Python neither cleans nor re-encodes the
path: the gateway sees exactly what an attacker would send.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import time
from unittest import mock

import pytest

from federimed.deploy.certs import ensure_certs
from federimed.deploy.flower import flower_env, superlink_argv
from federimed.deploy.gateway import FLEET_PATH, REFUSAL, caddyfile, gateway_argv
from federimed.deploy.local import free_port, superlink_healthy
from federimed.deploy.processes import ProcessGroup, wait_until
from federimed.settings import GatewaySettings, SuperLinkSettings

MiB = 1024 * 1024
# The smallest cap the setting accepts, so that an over-cap body is quick to stream.
CAP = 8 * MiB

# Each of these names a Control or Runtime method, or leaves the Fleet prefix, in some spelling
# a path-cleaning or decoding server could turn into one; every one must be refused by the
# gateway itself (403, its own text) and never reach the SuperLink.
REFUSED = [
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/runtime/get-nodes"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/get-run/../../control/list-runs"),
    ("POST", "/v1/control/list-runs/../../fleet/get-run"),
    ("POST", "/v1/control/x/../../fleet/pull-messages"),
    ("POST", "/v1/fleet/./get-run"),
    ("POST", "/v1/fleet/..%2Fcontrol%2Flist-runs"),
    ("POST", "/v1/fleet/..%2fcontrol%2flist-runs"),
    ("POST", "/v1/control%2Flist-runs"),
    ("POST", "/v1/control/list-runs%2F..%2F..%2Ffleet%2Fget-run"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/%2E%2E/control/list-runs"),
    ("POST", "/v1/control/list-runs/%2e%2e/%2e%2e/fleet/get-run"),
    ("POST", "/v1/fleet%2F..%2Fcontrol/list-runs"),
    ("POST", "/v1/fleet/..%5Ccontrol%5Clist-runs"),
    ("POST", "/v1/fleet/..\\control\\list-runs"),
    ("POST", "/v1/control/list-runs\\..\\..\\fleet\\get-run"),
    ("POST", "//v1/control/list-runs"),
    ("POST", "/v1/fleet//get-run"),
    ("POST", "/v1//fleet/get-run"),
    ("POST", "/v1/fleet//../control/list-runs"),
    ("POST", "/v1/fleet/%67et-run"),  # a plain letter, percent-encoded
    ("POST", "/V1/fleet/get-run"),
    ("POST", "/v1/fleet/get-run?x=1"),  # Flower's Fleet calls carry no query
    ("POST", "/v1/fleet/get-run/"),
    ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleet"),
    ("POST", "/health"),  # /health is read, never written to
    ("POST", "/health/../v1/control/list-runs"),
    ("GET", "/v1/fleet/get-run"),  # every Fleet call is a POST
    ("GET", "/health?x=1"),
    ("GET", "/"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One TLS SuperLink (node authentication on) and the gateway in front of it."""
    root = tmp_path_factory.mktemp("gateway")
    certs = root / "certs"
    ensure_certs(certs, [])
    link_port, gateway_port = free_port(), free_port()
    link = SuperLinkSettings(
        port=link_port,
        ca_cert=certs / "ca.crt",
        cert=certs / "superlink.crt",
        key=certs / "superlink.key",
        database=root / "state" / "superlink.db",
    )
    settings = GatewaySettings(
        port=gateway_port,
        superlink=f"127.0.0.1:{link_port}",
        ca_cert=certs / "ca.crt",
        cert=certs / "gateway.crt",
        key=certs / "gateway.key",
        state=root / "state" / "gateway",
        max_body_bytes=CAP,
    )
    caddy_home = {"XDG_DATA_HOME": str(settings.state), "XDG_CONFIG_HOME": str(settings.state)}
    with ProcessGroup(root / "logs") as group:
        superlink = group.start("superlink", superlink_argv(link), flower_env())
        group.start("gateway", gateway_argv(settings), flower_env() | caddy_home)
        ca = certs / "ca.crt"
        wait_until(lambda: superlink_healthy(f"127.0.0.1:{link_port}", ca), 60, "SuperLink", group)
        wait_until(lambda: superlink_healthy(f"127.0.0.1:{gateway_port}", ca), 30, "gateway", group)
        yield gateway_port, ca, superlink.log  # what _connect and _superlink_requests use


def _connect(stack, timeout: float = 10) -> http.client.HTTPSConnection:
    port, ca, _ = stack
    context = ssl.create_default_context(cafile=str(ca))
    return http.client.HTTPSConnection("localhost", port, context=context, timeout=timeout)


def _send(stack, method: str, path: str, body: bytes = b""):
    """One request with ``path`` byte for byte as given; (status, body)."""
    conn = _connect(stack)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/protobuf")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _superlink_requests(stack) -> list[str]:
    """The request lines the SuperLink logged (it logs every request but routine successes)."""
    text = stack[2].read_text(errors="replace")
    return [line for line in text.splitlines() if "uvicorn.access" in line]


def _mark(stack, name: str) -> int:
    """Send a canonical Fleet path that Flower does not serve (its refusal is logged); the
    number of request lines the SuperLink has logged up to and including it."""
    assert _send(stack, "POST", f"/v1/fleet/{name}")[0] in (401, 404)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = _superlink_requests(stack)
        found = [i for i, line in enumerate(lines) if f"/v1/fleet/{name} HTTP" in line]
        if found:
            return found[-1] + 1
        time.sleep(0.1)
    raise AssertionError(f"the SuperLink never logged {name}: {_superlink_requests(stack)}")


@pytest.mark.e2e
@pytest.mark.slow
def test_traversal_and_non_canonical_paths_are_refused_by_the_gateway(stack):
    begin = _mark(stack, "gateway-test-begin")
    answers = {}
    for method, path in REFUSED:
        status, body = _send(stack, method, path)
        answers[f"{method} {path}"] = (status, body[:80])
    wrong = {k: v for k, v in answers.items() if v != (403, REFUSAL.encode())}
    assert not wrong, f"not refused by the gateway itself: {json.dumps(wrong, default=str)}"
    end = _mark(stack, "gateway-test-end")
    # nothing between the two marks reached the SuperLink
    assert _superlink_requests(stack)[begin : end - 1] == []


@pytest.mark.e2e
@pytest.mark.slow
def test_fleet_and_health_still_go_through(stack):
    for method in ("GET", "HEAD"):
        status, body = _send(stack, method, "/health")
        assert status == 200, (method, status, body)
    for name in ("get-run", "pull-messages", "push-object", "send-node-heartbeat"):
        status, body = _send(stack, "POST", f"/v1/fleet/{name}")
        # the SuperLink's own answer: unauthenticated or not a valid message, never the gateway's
        assert status in (400, 401), (name, status, body)
        assert body != REFUSAL.encode()


@pytest.mark.e2e
@pytest.mark.slow
def test_an_announced_oversize_body_gets_413_before_it_is_sent(stack):
    """Only 100 bytes of the announced body are ever sent: the answer must not wait for more."""
    for length in (CAP + 1, 10**12):
        conn = _connect(stack, timeout=5)
        try:
            conn.putrequest("POST", "/v1/fleet/push-object", skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/protobuf")
            conn.putheader("Content-Length", str(length))
            conn.endheaders(b"x" * 100)
            started = time.monotonic()
            response = conn.getresponse()
            assert response.status == 413, (length, response.status, response.read())
            assert time.monotonic() - started < 5
        finally:
            conn.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_streamed_body_over_the_cap_gets_413_and_one_at_the_cap_goes_through(stack):
    def chunks(total: int, size: int = 256 * 1024):
        for start in range(0, total, size):
            yield b"\0" * min(size, total - start)

    conn = _connect(stack)
    try:  # chunked: no length announced, so the gateway counts what it reads
        conn.request(
            "POST",
            "/v1/fleet/push-object",
            body=chunks(CAP + 256 * 1024),
            headers={"Content-Type": "application/protobuf"},
            encode_chunked=True,
        )
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    status, body = _send(stack, "POST", "/v1/fleet/push-object", b"\0" * CAP)
    assert status == 400 and b"protobuf" in body, (status, body)  # the SuperLink read it all


def test_the_body_cap_is_a_typed_setting_written_into_the_caddyfile(tmp_path):
    from pydantic import ValidationError

    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDERIMED_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        assert GatewaySettings().max_body_bytes == 64 * MiB
    with mock.patch.dict(os.environ, clean | {"FEDERIMED_GATEWAY_MAX_BODY_BYTES": "16777216"}):
        settings = GatewaySettings(state=tmp_path)
    assert settings.max_body_bytes == 16 * MiB
    config = caddyfile(settings)
    assert "max_size 16777216" in config and "> 16777216" in config
    # below Flower's own 5 MiB array chunks every model push would be refused
    for bad in ("1048576", "-1", "99999999999", "lots"):
        environ = clean | {"FEDERIMED_GATEWAY_MAX_BODY_BYTES": bad}
        with mock.patch.dict(os.environ, environ), pytest.raises(ValidationError):
            GatewaySettings()


def test_every_fleet_method_of_flower_is_a_canonical_path_and_nothing_else_is():
    """The allow-list is a shape, not Flower's list: check Flower's routes still fit it."""
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet

    fleet_routes = [(route.path, route.methods) for route in fleet.routes]
    assert len(fleet_routes) >= 10, fleet_routes
    for path, methods in fleet_routes:
        assert re.search(FLEET_PATH, path) and methods == {"POST"}, path
    for route in control.routes:
        assert not re.search(FLEET_PATH, route.path), route.path
