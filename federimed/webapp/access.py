"""Who may use the web app, and from where (docs/webapp-security.md).

- **Tokens**, one per person, from a file the operator controls: ``name:scrypt$...`` lines,
  never the tokens themselves (``federimed serve --add-token NAME`` prints a new one once and
  keeps its salted scrypt hash; the file is 0600 in a 0700 folder).  A token is
  ``NAME.SECRET`` (32 random bytes), so checking one costs one scrypt, whatever the number of
  users; a checked token is remembered (in memory, by its SHA-256) until the file changes, so a
  client sending it with every request costs a dictionary look-up, and removing a line revokes
  the token at the next request.
- **Sessions** for people: the login page takes the token once and sets a cookie signed with a
  key that lives in this process only (a restart signs everyone out), HttpOnly,
  SameSite=Strict, Secure over HTTPS, bound to the user's current hash (a new token for that
  user ends the old sessions).
- **A single-sign-on proxy** (``auth=proxy-header``): the user its header names, believed only
  when the connection comes from one of the proxy's addresses.
- **Host names**: a request addressed to a name that is not the web app's gets 400, so a
  rebound DNS name (an attacker's page made to resolve to 127.0.0.1) reaches nothing.
- **Audit**: one JSON line per query (who, when, which model, the outcome; never the text).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

log = logging.getLogger("federimed.serve")
audit_log = logging.getLogger("federimed.audit")

USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# scrypt's cost: 16 MiB and about 40 ms per check, paid once per token and process (remembered
# afterwards). The tokens are 256 random bits: the hash is what a stolen file gives away.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
COOKIE = "federimed_session"
MAX_CHECKS = 64  # tokens being checked (scrypt) at once, the rest refused until there is room
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/login", "/logout", "/favicon.ico")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class TokenFileError(ValueError):
    """A tokens file that cannot be written or a user name that cannot be used."""


# --------------------------------------------------------------------------------- tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_token(token: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$SALT$HASH``: what the tokens file keeps of a token."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def token_matches(token: str, stored: str) -> bool:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
        return False
    n, r, p = (int(x) for x in parts[1:4])
    if not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):  # a hand-edited file's bounds
        return False
    try:
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
        memory = 256 * n * r + 2**20
        digest = hashlib.scrypt(
            token.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=memory
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected)


def new_token(name: str) -> str:
    return f"{name}.{secrets.token_urlsafe(32)}"


def token_user(token: str) -> str | None:
    """The user a token names (``NAME.SECRET``), or None for something that is no token."""
    name, dot, secret = token.rpartition(".")
    if not dot or len(secret) < 32 or not USER_NAME.fullmatch(name):
        return None
    return name


def read_tokens(path: Path) -> dict[str, str]:
    """name -> stored hash; a line that is no ``name:hash`` is named in the log and skipped."""
    users: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, stored = line.partition(":")
        if not colon or not USER_NAME.fullmatch(name) or not stored.startswith("scrypt$"):
            log.warning("%s, line %d: not 'name:scrypt$...', ignored", path, number)
            continue
        users[name] = stored
    return users


@contextlib.contextmanager
def _locked(path: Path):
    """The tokens file's folder (0700) and an exclusive lock beside the file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _write_tokens(path: Path, users: dict[str, str]) -> None:
    """Replaced whole (a reader never sees half a file), 0600 from its first byte."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write("# FederiMed web app users: name:scrypt hash (never the token)\n")
            handle.writelines(f"{name}:{stored}\n" for name, stored in sorted(users.items()))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def add_token(path: Path, name: str) -> str:
    """A new token for ``name`` (replacing any it had): returned once, only its hash is kept."""
    if not USER_NAME.fullmatch(name):
        raise TokenFileError(
            f"{name!r}: a user name is 1-64 letters, digits and . _ @ - (starting with a letter "
            "or digit)"
        )
    path = Path(path)
    token = new_token(name)
    with _locked(path):
        users = read_tokens(path) if path.exists() else {}
        users[name] = hash_token(token)
        _write_tokens(path, users)
    return token


def revoke_token(path: Path, name: str) -> bool:
    path = Path(path)
    with _locked(path):
        users = read_tokens(path) if path.exists() else {}
        if users.pop(name, None) is None:
            return False
        _write_tokens(path, users)
    return True


class TokenFile:
    """The users, re-read when the file changes (one stat per request)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._reading = threading.Lock()

    def users(self) -> dict[str, str]:
        try:
            status = os.stat(self.path)
        except OSError:
            self._stamp, self._users = None, {}
            return self._users
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        if stamp != self._stamp:
            with self._reading:
                try:
                    self._users = read_tokens(self.path)
                except (OSError, UnicodeDecodeError) as error:
                    log.error("cannot read the tokens file %s: %s", self.path, error)
                    self._users = {}
                self._stamp = stamp
            if status.st_mode & 0o007:  # group-readable is how a Kubernetes Secret arrives
                log.warning(
                    "%s is readable by every user (mode %o): chmod 600 it",
                    self.path,
                    status.st_mode & 0o777,
                )
        return self._users


# ------------------------------------------------------------------------------- sessions


def _fingerprint(stored: str) -> str:
    return hashlib.sha256(stored.encode()).hexdigest()[:16]


class Sessions:
    """Signed cookie values ``PAYLOAD.SIGNATURE`` (HMAC-SHA256 with a per-process key)."""

    def __init__(self, seconds: float, key: bytes | None = None):
        self.seconds = seconds
        self.key = key or secrets.token_bytes(32)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest())

    def issue(self, name: str, stored: str) -> str:
        expires = int(time.time() + self.seconds)
        body = json.dumps({"u": name, "e": expires, "f": _fingerprint(stored)})
        payload = _b64(body.encode())
        return f"{payload}.{self._sign(payload)}"

    def read(self, value: str, users: dict[str, str]) -> str | None:
        payload, dot, signature = value.partition(".")
        if not dot or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            body = json.loads(_unb64(payload))
            name, expires, fingerprint = body["u"], body["e"], body["f"]
        except (ValueError, KeyError, TypeError):
            return None
        stored = users.get(name)
        if stored is None or expires < time.time() or fingerprint != _fingerprint(stored):
            return None
        return name


# ---------------------------------------------------------------------------------- audit


class Audit:
    """One JSON line per query: who, when, which model, the outcome. Never the text."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else None
        self._writing = threading.Lock()

    def record(self, user: str | None, route: str, model: dict | None, outcome: str) -> None:
        line = json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "user": user or "-",
                "route": route,
                "model": {k: (model or {}).get(k) for k in ("run_id", "folder", "kind")},
                "outcome": outcome,
            },
            sort_keys=True,
        )
        if self.path is None:
            audit_log.info("%s", line)
            return
        with self._writing:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


# --------------------------------------------------------------------------------- policy


def _networks(text: str) -> list[Network]:
    return [ipaddress.ip_network(i.strip(), strict=False) for i in text.split(",") if i.strip()]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_name(header: str) -> str:
    """The name in a Host header: no port, no brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") > 1:  # a bare IPv6 address
        return header
    return header.partition(":")[0].rstrip(".")


@dataclass
class AccessControl:
    """What `federimed serve` checks before a request reaches a route (from ServeSettings)."""

    mode: Literal["token", "proxy-header", "none"] = "token"
    tokens: TokenFile | None = None
    trusted_proxies: list[Network] = field(default_factory=list)
    user_header: str = "X-Forwarded-User"
    allowed_hosts: list[str] = field(default_factory=list)
    healthz: Literal["open", "auth"] = "open"
    metrics: Literal["auth", "open", "off"] = "auth"
    cookie_secure: Literal["auto", "always", "never"] = "auto"
    sessions: Sessions = field(default_factory=lambda: Sessions(12 * 3600))
    audit: Audit = field(default_factory=Audit)
    _known: dict[bytes, tuple[str, str]] = field(default_factory=dict, repr=False)
    _pending: dict[bytes, Future] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _checking: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="federimed-auth"),
        repr=False,
    )

    @classmethod
    def from_settings(cls, settings: Any) -> AccessControl:
        names = [h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()]
        return cls(
            mode=settings.auth,
            tokens=TokenFile(settings.tokens),
            trusted_proxies=_networks(settings.trusted_proxies),
            user_header=settings.proxy_user_header,
            allowed_hosts=[*LOOPBACK_NAMES, settings.host.lower(), *names],
            healthz=settings.healthz,
            metrics=settings.metrics,
            cookie_secure=settings.cookie_secure,
            sessions=Sessions(settings.session_hours * 3600),
            audit=Audit(settings.audit_log),
        )

    # -- the checks

    def host_allowed(self, header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        if not header:
            return False
        name = host_name(header)
        if _is_ip(name):  # a rebound DNS name arrives as that name, never as an address
            return True
        return any(
            name == allowed or (allowed.startswith("*.") and name.endswith(allowed[1:]))
            for allowed in self.allowed_hosts
        )

    def same_site(self, origin: str, host: str) -> bool:
        """A browser's Origin on a signed-in POST: this site as addressed, or an allowed name
        (a proxy may rewrite Host); SameSite=Strict already keeps the cookie off other sites'
        requests, this is the second lock."""
        netloc = urlsplit(origin).netloc.lower()
        if not netloc:
            return False
        name = host_name(netloc)
        return netloc == host.strip().lower() or name in self.allowed_hosts

    def from_proxy(self, scope: dict) -> bool:
        client = scope.get("client")
        if not client or not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

    def is_https(self, scope: dict, headers: dict[str, str]) -> bool:
        if scope.get("scheme") == "https":
            return True
        proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        return proto == "https" and self.from_proxy(scope)

    def users(self) -> dict[str, str]:
        return self.tokens.users() if self.tokens else {}

    def _remembered(self, token: str) -> str | None:
        key = hashlib.sha256(token.encode()).digest()
        hit = self._known.get(key)
        if hit and self.users().get(hit[0]) == hit[1]:
            return hit[0]
        return None

    def _check(self, token: str) -> str | None:
        """The slow path (scrypt), off the event loop; a match is remembered."""
        name = token_user(token)
        stored = self.users().get(name) if name else None
        if name is None or stored is None or not token_matches(token, stored):
            return None
        if len(self._known) > 10_000:
            self._known.clear()
        self._known[hashlib.sha256(token.encode()).digest()] = (name, stored)
        return name

    async def check_token(self, token: str) -> str | None:
        """The user a token belongs to, or None. Requests that bring the same new token at
        once wait for one check; with MAX_CHECKS checks of other tokens already waiting (a
        flood of wrong ones), a new token is refused at once instead of queueing."""
        remembered = self._remembered(token)
        if remembered is not None:
            return remembered
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            pending, first = self._pending.get(key), None
            if pending is None:
                if len(self._pending) >= MAX_CHECKS:
                    return None
                pending = first = self._checking.submit(self._check, token)
                self._pending[key] = pending
        if first is not None:
            # Outside the lock: a check that is already done runs the callback here, at once,
            # and the callback takes the lock (inside it, the event loop deadlocked).
            first.add_done_callback(lambda _: self._forget(key))
        return await asyncio.wrap_future(pending)

    def _forget(self, key: bytes) -> None:
        with self._lock:
            self._pending.pop(key, None)

    async def identify(self, scope: dict, headers: dict[str, str]) -> tuple[str | None, str]:
        """(user, how): how is 'bearer', 'session', 'proxy' or 'none'."""
        if self.mode == "none":
            return "anonymous", "none"
        if self.mode == "proxy-header" and self.from_proxy(scope):
            user = headers.get(self.user_header.lower(), "").strip()
            if user and len(user) <= 256 and user.isprintable():
                return user, "proxy"
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return await self.check_token(credentials.strip()), "bearer"
        if self.mode == "token":
            cookie = _cookies(headers.get("cookie", "")).get(COOKIE)
            if cookie:
                return self.sessions.read(cookie, self.users()), "session"
        return None, "none"

    def cookie(self, value: str, https: bool, clear: bool = False) -> str:
        secure = self.cookie_secure == "always" or (self.cookie_secure == "auto" and https)
        age = 0 if clear else int(self.sessions.seconds)
        flags = f"; Max-Age={age}; Path=/; HttpOnly; SameSite=Strict"
        return f"{COOKIE}={value}{flags}{'; Secure' if secure else ''}"


def _cookies(header: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            jar.setdefault(name, value)
    return jar


def safe_next(target: str | None) -> str:
    """Where the login page sends a person afterwards: a path on this site only."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


# ----------------------------------------------------------------------------- middleware


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def refuse(
    send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await _respond(send, status, body, [(b"content-type", b"application/json"), *headers])


class AccessMiddleware:
    """Host names first (400), then who is asking: 401 for the API, the login page for pages.
    Routes read the user from ``request.state.user``."""

    def __init__(self, app: ASGIApp, control: AccessControl):
        self.app = app
        self.control = control

    def _needs_user(self, path: str) -> bool:
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return False
        if path == "/healthz":
            return self.control.healthz == "auth"
        if path == "/metrics":
            return self.control.metrics == "auth"
        return True

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        control = self.control
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not control.host_allowed(headers.get("host")):
            await refuse(
                send, 400, "this web app does not answer to that host name (allowed_hosts)"
            )
            return
        path = scope["path"]
        if path == "/metrics" and control.metrics == "off":
            await refuse(send, 404, "Not Found")
            return
        user, how = await control.identify(scope, headers)
        scope.setdefault("state", {})
        scope["state"].update(user=user, auth=how, https=control.is_https(scope, headers))
        if user is None and self._needs_user(path):
            if path.startswith("/api/") or path in ("/openapi.json", "/metrics", "/healthz"):
                detail = (
                    "sign in: Authorization: Bearer <token> (federimed serve --add-token NAME)"
                    if control.mode == "token"
                    else "sign in through the hospital's single-sign-on"
                )
                challenge = [(b"www-authenticate", b'Bearer realm="federimed"')]
                await refuse(send, 401, detail, challenge)
            else:
                query = scope.get("query_string", b"").decode("latin-1")
                target = path + (f"?{query}" if query else "")
                location = "/login?next=" + quote(target, safe="")
                await _respond(send, 303, b"", [(b"location", location.encode())])
            return
        if how == "session" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and not control.same_site(origin, headers.get("host", "")):
                await refuse(send, 403, "cross-site request refused (Origin)")
                return
        await self.app(scope, receive, send)
