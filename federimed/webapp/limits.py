"""Limits that hold before the work is done.

- :class:`BodyLimit`: a request body larger than the limit gets 413 before it is read (its
  Content-Length says so) or as soon as the bytes that arrived pass the limit (a chunked body
  that says nothing): nothing downstream parses more than the limit.
- :class:`Admission`: how many requests of a kind may be in progress at once; one more is
  refused at once (429 with Retry-After) instead of queueing without end.
- :class:`AnswerResponse`: a generative model's answer streamed while its own thread writes it;
  the response listens for the client leaving and stops the generation then (the thread ends
  at its next piece), and no thread of anyio's shared pool is held while it streams, so the
  synchronous routes (/runs, /api/runs) and /healthz go on answering.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading

import anyio
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

log = logging.getLogger("federimed.serve")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class BodyLimit:
    """Pure ASGI (it sees the body's bytes as they arrive, before any parsing)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None:
            if not length.strip().isdigit():
                await _refuse(send, 400, "Content-Length is not a number")
                return
            if int(length) > self.limit:
                await _refuse(send, 413, BodyTooLarge(self.limit).detail)
                return
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except BodyTooLarge as error:
            if started:
                raise
            await _refuse(send, 413, error.detail)


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the rest of the body is never read
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Ticket:
    """A place taken in an :class:`Admission`; released once, however often it is asked."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._leave()


class Admission:
    """At most ``capacity`` requests of a kind in progress (thread-safe: generation threads
    release their place when they end, which may be after the response ended)."""

    def __init__(self, capacity: int, retry_after: int):
        self.capacity = capacity
        self.retry_after = retry_after
        self.inside = 0
        self._lock = threading.Lock()

    def enter(self) -> Ticket | None:
        with self._lock:
            if self.inside >= self.capacity:
                return None
            self.inside += 1
        return Ticket(self)

    def _leave(self) -> None:
        with self._lock:
            self.inside -= 1


class AnswerResponse(StreamingResponse):
    """Streams ``answer.pieces()``; whatever ends it (the answer, the client leaving, an error)
    stops the generation and frees its place. Always listens for the client leaving (Starlette
    does so only for ASGI servers older than spec 2.4, and uvicorn's is newer)."""

    def __init__(self, answer):
        super().__init__(answer.pieces(), media_type="text/plain; charset=utf-8")
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away while we wrote
                    except Exception as error:  # the model failed mid-answer: end the stream
                        log.error("answer stopped by an error: %s", type(error).__name__)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                self.answer.close()
