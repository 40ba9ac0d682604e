"""A fault-injecting HTTP/1.1 reverse proxy, for tests of how glancefs survives a bad network.

:class:`FaultProxy` listens on 127.0.0.1 (a free port) in front of an ``upstream`` URL (a lab
Glance, or the production lab's HAProxy) and runs in background threads of the test process::

    with FaultProxy(glance.url, seed=7) as proxy:
        proxy.flip_byte(method="GET", path=IMAGE_DATA, times=1)
        data = read_through(proxy.url)                    # any HTTP client
        (flip,) = proxy.flips                              # which image byte was changed
        assert proxy.data_gets(image_id) == [DataGet(image_id, None)]

Every request is forwarded unchanged (same method, target, headers and Host; one upstream
connection per request) unless a rule picks it.  Client connections are kept alive; request and
response bodies may have a Content-Length or be chunked (they are forwarded in the same framing,
re-chunked in blocks of up to 1 MiB); Range requests and 206 answers pass through untouched.
Bodies move in 1 MiB blocks, so the proxy costs little next to Glance itself.

Rules
    Each rule method (:meth:`FaultProxy.fail`, ...) adds a :class:`Rule` and returns it.  A rule
    picks a request when its method is ``method`` (any if omitted), the regex ``path`` is found
    in the request target (path and query, e.g. :data:`IMAGE_DATA`, :data:`LATER_PAGES`),
    ``where(request)`` holds, it fired fewer than ``times`` times, and its own
    ``random.Random(seed)`` draws under ``probability``.  The first rule (in the order added)
    that picks a request applies to it; one fault per request.  Rules can be added, removed
    (:meth:`Rule.remove`) and cleared (:meth:`FaultProxy.clear`) while the proxy runs.

Faults
    ``fail(status=503)``
        answer at once with a Glance-like error (HTML, or JSON when the request accepts it);
        the request never reaches upstream; the connection stays usable.
    ``reset_after(n)``
        forward the response head and ``n`` body bytes, then reset the connection (RST,
        SO_LINGER 0), as a crashed server or a middlebox does.
    ``truncate_after(n)``
        forward the head and ``n`` body bytes, then close cleanly (FIN): a short body.
    ``flip_byte(offset=None)``
        invert one body byte (at ``offset`` in the body, or a random one) and record a
        :class:`Flip`, whose ``image_offset`` counts from the Content-Range start.
    ``delay(seconds)``
        forward the request, and hold the upstream's answer for ``seconds`` before relaying it
        (the server did the work; the client hears of it late).
    ``hang(seconds=None)``
        never answer: the request is not forwarded, and the connection is closed when the rule
        is released or removed, the proxy stops, or the time bound passes.
    ``reset_upload_after(n)``
        forward ``n`` bytes of the request body, then reset both the client and the upstream
        connection (Glance sees a cut upload).
    ``hold()``
        keep the request back until :meth:`Rule.release` (or removal, stop, the bound), then
        forward it; :meth:`Rule.wait_holding` tells that a request is being held.

    A body fault whose ``n`` or ``offset`` is past the end of the body has no effect (the rule
    still counts as fired).  No wait is longer than ``max_wait`` (60 s by default).

Counts
    Every request is counted when it arrives, faulted or not: :meth:`FaultProxy.count` and
    :meth:`FaultProxy.counts` per (method, path without query), :meth:`FaultProxy.data_gets`
    for image-data GETs (with the Range header seen), :meth:`FaultProxy.requests` for the heads
    themselves (method, target and headers, as the client sent them: what went over the wire).
    :meth:`FaultProxy.reset_counts` empties them and the recorded flips.  All are thread-safe.

Pitfalls: upstream must be plain http; ``Expect: 100-continue`` is answered by the proxy itself
(it does not forward Expect); a response without any framing is relayed until upstream closes,
then the client connection is closed too.  The proxy's threads live in the process that started
it: a mount behind it must not be mmap-ed by that process (a page fault holds the process's mmap
lock until the mount answers, and a proxy thread that maps memory then waits for that lock: a
deadlock); map its files in a child process.
"""

from __future__ import annotations

import contextlib
import fcntl
import http
import json
import random
import re
import socket
import struct
import termios
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self, TypedDict, Unpack

__all__ = [
    "IMAGE_DATA",
    "LATER_PAGES",
    "DataGet",
    "FaultProxy",
    "Flip",
    "Match",
    "Request",
    "Rule",
]

#: ``path`` regex of image data: GET for downloads, PUT for uploads.
IMAGE_DATA = r"^/v2/images/[^/?]+/file(?:\?|$)"
#: ``path`` regex of listing pages after the first (they carry a marker).
LATER_PAGES = r"[?&]marker="

DEFAULT_MAX_WAIT = 60.0
#: Socket timeout for anything else (a client idle on a kept-alive connection, a slow upstream):
#: long enough for a GiB upload, which Glance hashes before it answers.
IO_TIMEOUT = 600.0
#: Bodies are forwarded in blocks of this size: one recv and one send per MiB, no per-byte work.
BLOCK = 1 << 20
MAX_HEAD = 64 * 1024
#: How long a reset waits for the bytes already sent to leave the socket before it discards them.
FLUSH_TIMEOUT = 5.0

_DATA_TARGET = re.compile(r"^/v2/images/([^/?]+)/file(?:\?|$)")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)")
# Hop-by-hop headers (RFC 9110 7.6.1) and Expect: the proxy frames each hop itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
# webob's explanations, which Glance's error pages carry.
_EXPLANATIONS = {
    500: "The server has either erred or is incapable of performing the requested operation.",
    502: "Bad gateway.",
    503: "The server is currently unavailable. Please try again at a later time.",
    504: "The gateway has timed out.",
}

Headers = list[tuple[str, str]]
Kind = Literal["fail", "reset", "truncate", "flip", "delay", "hang", "upload_reset", "hold"]
# How a body is delimited: its length, chunked, until the connection closes, or no body at all.
Framing = tuple[Literal["length"], int] | tuple[Literal["chunked", "close", "none"], None]


class _ProtocolError(Exception):
    """A peer sent something that is not HTTP/1.1, or closed in the middle of a message."""


@dataclass(frozen=True)
class Request:
    """A request as rules see it (head only: the body is still on its way)."""

    method: str
    target: str  # path and query, as sent
    version: str
    headers: Headers

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.split("?", 1)[0]

    @property
    def image_id(self) -> str | None:
        """The image id when the target is an image's data (``/v2/images/<id>/file``)."""
        m = _DATA_TARGET.match(self.target)
        return m.group(1) if m else None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        return _header(self.headers, name)


@dataclass(frozen=True)
class DataGet:
    """One GET of image data: which image, and the Range header (None for the whole image)."""

    image_id: str
    range: str | None


@dataclass(frozen=True)
class Flip:
    """A byte that flip_byte changed: ``old`` became ``new`` (= old ^ 0xFF).

    ``body_offset`` counts in the response body; ``image_offset`` adds the start of the
    response's Content-Range (206), so it is the offset in the image itself.
    """

    image_id: str | None
    target: str
    body_offset: int
    image_offset: int
    old: int
    new: int


class Match(TypedDict, total=False):
    """Which requests a rule picks (all given conditions must hold); see the module docstring."""

    method: str
    path: str
    where: Callable[[Request], bool]
    times: int
    probability: float
    seed: int


class Rule:
    """One fault and the requests it picks; made by the FaultProxy rule methods."""

    def __init__(
        self,
        proxy: FaultProxy,
        kind: Kind,
        match: Match,
        *,
        nbytes: int = 0,
        offset: int | None = None,
        seconds: float = 0.0,
        status: int = 503,
        headers: Headers | None = None,
    ) -> None:
        self.kind: Kind = kind
        self.method = match.get("method")
        self.path = re.compile(match["path"]) if "path" in match else None
        self.where = match.get("where")
        self.times = match.get("times")
        self.probability = match.get("probability", 1.0)
        self.nbytes = nbytes  # reset, truncate, upload_reset: the body bytes let through
        self.offset = offset  # flip: the body offset, None for a random one
        self.seconds = seconds  # delay, hang, hold: the longest wait
        self.status = status  # fail
        self.extra_headers = list(headers or [])  # fail
        #: How many requests the rule applied to so far.
        self.fired = 0
        self._rng = random.Random(match.get("seed", proxy.seed))
        self._proxy = proxy
        self._released = False
        self._holding = 0

    def __repr__(self) -> str:
        return f"<Rule {self.kind} method={self.method} path={self.path} fired={self.fired}>"

    def _picks(self, request: Request) -> bool:
        """Whether this rule applies to ``request`` (caller holds the proxy's lock)."""
        if self._released or (self.times is not None and self.fired >= self.times):
            return False
        if self.method is not None and request.method != self.method:
            return False
        if self.path is not None and not self.path.search(request.target):
            return False
        if self.where is not None and not self.where(request):
            return False
        return self.probability >= 1.0 or self._rng.random() < self.probability

    @property
    def holding(self) -> bool:
        """True while the rule is keeping at least one request back (hold, hang, delay)."""
        with self._proxy._cond:
            return self._holding > 0

    def wait_holding(self, timeout: float = 10.0) -> bool:
        """Wait until a request is being kept back; False if none was within ``timeout``."""
        with self._proxy._cond:
            return self._proxy._cond.wait_for(lambda: self._holding > 0, timeout)

    def release(self) -> None:
        """Let the requests kept back go on; the rule picks no more requests from now on."""
        with self._proxy._cond:
            self._released = True
            self._proxy._cond.notify_all()

    def remove(self) -> None:
        """Release the rule and take it off the proxy."""
        self.release()
        with self._proxy._cond, contextlib.suppress(ValueError):
            self._proxy._rules.remove(self)

    def _keep_back(self, seconds: float) -> None:
        """Block until released, the proxy stops, or ``seconds`` (capped at max_wait) pass."""
        proxy = self._proxy
        with proxy._cond:
            self._holding += 1
            proxy._cond.notify_all()
            try:
                proxy._cond.wait_for(
                    lambda: self._released or proxy._stopping, min(seconds, proxy.max_wait)
                )
            finally:
                self._holding -= 1


class FaultProxy:
    """Reverse proxy on 127.0.0.1 in front of ``upstream`` that injects faults and counts requests.

    Use it as a context manager (or start()/stop()); stop() closes every connection and ends
    every thread it started, also while requests are held.  ``seed`` is the default seed of
    each rule's random.Random; ``max_wait`` bounds every hold, hang and delay.
    """

    def __init__(self, upstream: str, *, seed: int = 0, max_wait: float = DEFAULT_MAX_WAIT) -> None:
        target = urllib.parse.urlsplit(upstream)
        if target.scheme != "http" or not target.hostname:
            raise ValueError(f"FaultProxy forwards to http://host:port only, not {upstream!r}")
        self.upstream = (target.hostname, target.port or 80)
        self.seed = seed
        self.max_wait = max_wait
        self._cond = threading.Condition()
        self._rules: list[Rule] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._data_gets: list[DataGet] = []
        self._requests: list[Request] = []
        self._flips: list[Flip] = []
        self._stopping = False
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(
            target=self._accept, name="faultproxy-accept", daemon=True
        )

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> Self:
        """Start accepting connections (the port is bound since the constructor)."""
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, wake every waiting request, join threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on them
        if self._acceptor.is_alive():
            self._acceptor.join(10)
        with self._cond:
            threads = list(self._threads)
        for thread in threads:
            thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- rules ------------------------------------------------------------------------------------
    def fail(
        self, status: int = 503, *, headers: Headers | None = None, **match: Unpack[Match]
    ) -> Rule:
        """Answer ``status`` with a Glance-like error body (plus ``headers``, e.g. Retry-After)."""
        return self._add(Rule(self, "fail", match, status=status, headers=headers))

    def reset_after(self, nbytes: int, **match: Unpack[Match]) -> Rule:
        """Reset (RST) the connection after ``nbytes`` of the response body."""
        return self._add(Rule(self, "reset", match, nbytes=nbytes))

    def truncate_after(self, nbytes: int, **match: Unpack[Match]) -> Rule:
        """Close the connection cleanly after ``nbytes`` of the response body."""
        return self._add(Rule(self, "truncate", match, nbytes=nbytes))

    def flip_byte(self, offset: int | None = None, **match: Unpack[Match]) -> Rule:
        """Invert the body byte at ``offset`` (random within Content-Length if None)."""
        return self._add(Rule(self, "flip", match, offset=offset))

    def delay(self, seconds: float, **match: Unpack[Match]) -> Rule:
        """Relay upstream's answer ``seconds`` late."""
        return self._add(Rule(self, "delay", match, seconds=seconds))

    def hang(self, seconds: float | None = None, **match: Unpack[Match]) -> Rule:
        """Never answer; close the connection after ``seconds`` (max_wait if None) or release."""
        bound = self.max_wait if seconds is None else seconds
        return self._add(Rule(self, "hang", match, seconds=bound))

    def reset_upload_after(self, nbytes: int, **match: Unpack[Match]) -> Rule:
        """Reset both connections after ``nbytes`` of the request body went upstream."""
        return self._add(Rule(self, "upload_reset", match, nbytes=nbytes))

    def hold(self, **match: Unpack[Match]) -> Rule:
        """Keep requests back until the rule is released (then forward them)."""
        return self._add(Rule(self, "hold", match, seconds=self.max_wait))

    def clear(self) -> None:
        """Remove every rule, releasing the requests they keep back."""
        with self._cond:
            rules, self._rules = self._rules, []
        for rule in rules:
            rule.release()

    @property
    def rules(self) -> list[Rule]:
        """The rules in the order they are tried."""
        with self._cond:
            return list(self._rules)

    def _add(self, rule: Rule) -> Rule:
        with self._cond:
            self._rules.append(rule)
        return rule

    # -- counts -----------------------------------------------------------------------------------
    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests seen with this method and whose path (no query) matches the regex ``path``."""
        pattern = re.compile(path) if path is not None else None
        with self._cond:
            return sum(
                n
                for (m, p), n in self._counts.items()
                if (method is None or m == method) and (pattern is None or pattern.search(p))
            )

    def counts(self) -> dict[tuple[str, str], int]:
        """Requests seen per (method, path without query)."""
        with self._cond:
            return dict(self._counts)

    def data_gets(self, image_id: str | None = None) -> list[DataGet]:
        """Image-data GETs seen (of ``image_id`` only, if given), in arrival order."""
        with self._cond:
            return [d for d in self._data_gets if image_id is None or d.image_id == image_id]

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """The heads of the requests seen with this method and whose target (path and query)
        matches the regex ``path``, in arrival order."""
        pattern = re.compile(path) if path is not None else None
        with self._cond:
            return [
                r
                for r in self._requests
                if (method is None or r.method == method)
                and (pattern is None or pattern.search(r.target))
            ]

    @property
    def flips(self) -> list[Flip]:
        """Bytes changed by flip_byte rules, in order."""
        with self._cond:
            return list(self._flips)

    def reset_counts(self) -> None:
        """Forget every count, data GET and flip recorded so far."""
        with self._cond:
            self._counts.clear()
            self._data_gets.clear()
            self._requests.clear()
            self._flips.clear()

    # -- connections ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stop() closed the listener
            thread = threading.Thread(
                target=self._serve, args=(client,), name="faultproxy-conn", daemon=True
            )
            with self._cond:
                if self._stopping:
                    client.close()
                    return
                self._threads.add(thread)
            thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        """Register a socket for stop() (closing it if the proxy is stopping already)."""
        with self._cond:
            if self._stopping:
                sock.close()
                raise OSError("proxy stopping")
            self._sockets.add(sock)
        sock.settimeout(IO_TIMEOUT)
        return sock

    def _untrack(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)
        sock.close()

    def _serve(self, client: socket.socket) -> None:
        """Answer the requests of one client connection until it or a fault ends it."""
        try:
            self._track(client)
            reader = _Reader(client)
            while (head := reader.read_head()) is not None:
                if not self._exchange(_parse_request(head), reader, client):
                    break
        except (OSError, _ProtocolError):
            pass  # the client went away or spoke no HTTP: nothing to answer
        finally:
            self._untrack(client)
            with self._cond:
                self._threads.discard(threading.current_thread())

    def _pick(self, request: Request) -> Rule | None:
        """Count the request and choose the rule that applies to it, if any."""
        with self._cond:
            self._counts[(request.method, request.path)] += 1
            self._requests.append(request)
            image_id = request.image_id
            if request.method == "GET" and image_id is not None:
                self._data_gets.append(DataGet(image_id, request.header("Range")))
            for rule in self._rules:
                if rule._picks(request):
                    rule.fired += 1
                    return rule
        return None

    def _exchange(self, request: Request, reader: _Reader, client: socket.socket) -> bool:
        """Forward one request and its answer, applying a fault; True to keep the connection."""
        rule = self._pick(request)
        kind = rule.kind if rule is not None else None
        if rule is not None and kind == "hang":
            rule._keep_back(rule.seconds)
            return False
        if rule is not None and kind == "hold":
            rule._keep_back(rule.seconds)
        framing = _request_framing(request)
        keep = _keep_alive(request)
        if rule is not None and kind == "fail":
            _drain(reader, client, request, framing)
            client.sendall(_error_response(rule.status, request, rule.extra_headers, keep=keep))
            return keep
        try:
            upstream = self._track(socket.create_connection(self.upstream, timeout=IO_TIMEOUT))
        except OSError:  # upstream is down: what a gateway answers
            _drain(reader, client, request, framing)
            client.sendall(_error_response(502, request, [], keep=keep))
            return keep
        try:
            return self._forward(request, rule, reader, client, upstream, framing)
        finally:
            self._untrack(upstream)

    def _forward(
        self,
        request: Request,
        rule: Rule | None,
        reader: _Reader,
        client: socket.socket,
        upstream: socket.socket,
        framing: Framing,
    ) -> bool:
        """Send the request upstream, relay the answer; True to keep the client connection."""
        try:
            upstream.sendall(_request_head(request, framing))
            if framing[0] != "none":
                _continue(client, request)
                limit = rule.nbytes if rule is not None and rule.kind == "upload_reset" else None
                if not _copy_body(reader, framing, upstream, limit):
                    _reset(upstream)
                    _reset(client)
                    return False
            up_reader = _Reader(upstream)
            status, reason, headers = _parse_response(up_reader.read_head())
        except (OSError, _ProtocolError):
            # upstream died (or the client did, and then this send fails too): a gateway error
            client.sendall(_error_response(502, request, [], keep=False))
            return False
        if rule is not None and rule.kind == "delay":
            rule._keep_back(rule.seconds)
        body = _response_framing(request, status, headers)
        keep = _keep_alive(request) and body[0] != "close"
        client.sendall(_response_head(status, reason, headers, body, keep))
        try:
            complete = self._relay(request, rule, status, headers, up_reader, body, client)
        except (OSError, _ProtocolError):
            _reset(client)  # upstream broke off: so must we, or the client takes a short body
            return False
        return complete and keep

    def _relay(
        self,
        request: Request,
        rule: Rule | None,
        status: int,
        headers: Headers,
        src: _Reader,
        framing: Framing,
        client: socket.socket,
    ) -> bool:
        """Relay the response body with the rule's body fault; False if the fault cut it."""
        kind = rule.kind if rule is not None else None
        cut = rule.nbytes if rule is not None and kind in ("reset", "truncate") else None
        flip_at = self._flip_offset(rule, framing) if rule is not None and kind == "flip" else None
        offset = 0
        for piece in _pieces(src, framing):
            if cut is not None and offset + len(piece) > cut:
                _send_piece(client, piece[: cut - offset], framing)
                if kind == "reset":
                    _reset(client)
                else:
                    _close_cleanly(client)
                return False
            if flip_at is not None and offset <= flip_at < offset + len(piece):
                self._flip(request, status, headers, piece, flip_at, offset)
            _send_piece(client, piece, framing)
            offset += len(piece)
        if framing[0] == "chunked":
            client.sendall(b"0\r\n\r\n")
        return True

    def _flip_offset(self, rule: Rule, framing: Framing) -> int | None:
        """The body offset a flip rule changes (random below Content-Length if none was given)."""
        if rule.offset is not None:
            return rule.offset
        if framing[0] != "length" or not framing[1]:
            return None  # no known length to draw from: nothing flipped
        with self._cond:
            return rule._rng.randrange(framing[1])

    def _flip(
        self,
        request: Request,
        status: int,
        headers: Headers,
        piece: memoryview,
        flip_at: int,
        offset: int,
    ) -> None:
        """Invert one byte of ``piece`` (in place) and record it."""
        old = piece[flip_at - offset]
        piece[flip_at - offset] = old ^ 0xFF
        start = 0
        content_range = _header(headers, "Content-Range")
        if status == 206 and content_range and (m := _CONTENT_RANGE.match(content_range)):
            start = int(m.group(1))
        flip = Flip(request.image_id, request.target, flip_at, start + flip_at, old, old ^ 0xFF)
        with self._cond:
            self._flips.append(flip)


# -- HTTP/1.1 plumbing ----------------------------------------------------------------------------
class _Reader:
    """Buffered reads from a socket: heads and chunk lines from a small buffer, bodies in blocks.

    read_some() returns a writable view into a buffer reused by the next call: a flip changes
    the bytes in place, and the caller must send them before reading again.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._block = bytearray(BLOCK)
        self._view = memoryview(self._block)
        self._pending = bytearray()  # bytes received past the last head or line

    def _fill(self) -> bool:
        """Append one recv to the pending bytes; False at EOF."""
        n = self._sock.recv_into(self._block, MAX_HEAD)
        self._pending += self._view[:n]
        return n > 0

    def _until(self, delimiter: bytes) -> bytes | None:
        """Pending bytes up to and including ``delimiter``; None at EOF before any byte."""
        while (end := self._pending.find(delimiter)) < 0:
            if len(self._pending) > MAX_HEAD:
                raise _ProtocolError("header or chunk line too long")
            if not self._fill():
                if self._pending:
                    raise _ProtocolError("connection closed in the middle of a line")
                return None
        line = bytes(self._pending[: end + len(delimiter)])
        del self._pending[: end + len(delimiter)]
        return line

    def read_head(self) -> bytes | None:
        """One message head (through the blank line); None when the peer closed between messages."""
        while self._pending.startswith(b"\r\n"):  # stray CRLF after a body (RFC 9112 2.2)
            del self._pending[:2]
        return self._until(b"\r\n\r\n")

    def readline(self) -> bytes:
        """One CRLF-terminated line (chunk sizes, trailers)."""
        line = self._until(b"\r\n")
        if line is None:
            raise _ProtocolError("connection closed in a chunked body")
        return line

    def read_some(self, n: int) -> memoryview:
        """Up to ``n`` bytes (at most one recv); empty at EOF."""
        if self._pending:
            piece = self._pending[:n]
            del self._pending[:n]
            return memoryview(piece)
        got = self._sock.recv_into(self._block, min(n, BLOCK))
        return self._view[:got]


def _header(headers: Headers, name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


def _parse_head(head: bytes) -> tuple[list[str], Headers]:
    """Split a message head into its start line's words and its headers."""
    lines = head.decode("latin-1").split("\r\n")
    headers: Headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise _ProtocolError(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0].split(" ", 2), headers


def _parse_request(head: bytes) -> Request:
    words, headers = _parse_head(head)
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        raise _ProtocolError(f"bad request line {words!r}")
    return Request(words[0], words[1], words[2], headers)


def _parse_response(head: bytes | None) -> tuple[int, str, Headers]:
    if head is None:
        raise _ProtocolError("upstream closed without answering")
    words, headers = _parse_head(head)
    if len(words) < 2 or not words[0].startswith("HTTP/1.") or not words[1].isdigit():
        raise _ProtocolError(f"bad status line {words!r}")
    return int(words[1]), words[2] if len(words) > 2 else "", headers


def _framing(headers: Headers) -> Framing | None:
    """Framing given by Transfer-Encoding or Content-Length, None if neither is there."""
    if "chunked" in (_header(headers, "Transfer-Encoding") or "").lower():
        return ("chunked", None)
    length = _header(headers, "Content-Length")
    if length is not None:
        if not length.isdigit():
            raise _ProtocolError(f"bad Content-Length {length!r}")
        return ("length", int(length))
    return None


def _request_framing(request: Request) -> Framing:
    framing = _framing(request.headers)
    if framing is None or framing == ("length", 0):
        return ("none", None)
    return framing


def _response_framing(request: Request, status: int, headers: Headers) -> Framing:
    if request.method == "HEAD" or status < 200 or status in (204, 304):
        return ("none", None)
    return _framing(headers) or ("close", None)


def _keep_alive(request: Request) -> bool:
    tokens = (request.header("Connection") or "").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _without_hop_by_hop(headers: Headers) -> list[str]:
    return [f"{k}: {v}\r\n" for k, v in headers if k.lower() not in _HOP_BY_HOP]


def _request_head(request: Request, framing: Framing) -> bytes:
    lines = [f"{request.method} {request.target} HTTP/1.1\r\n"]
    lines += _without_hop_by_hop(request.headers)
    if framing[0] == "chunked":
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append("Connection: close\r\n\r\n")  # one upstream connection per request
    return "".join(lines).encode("latin-1")


def _response_head(
    status: int, reason: str, headers: Headers, framing: Framing, keep: bool
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n", *_without_hop_by_hop(headers)]
    if framing[0] == "chunked":
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append(f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n")
    return "".join(lines).encode("latin-1")


def _error_response(status: int, request: Request, extra: Headers, *, keep: bool) -> bytes:
    """A complete error answer shaped like Glance's (webob's): HTML, or JSON if accepted."""
    phrase = http.HTTPStatus(status).phrase
    explanation = _EXPLANATIONS.get(status, phrase + ".")
    if "application/json" in (request.header("Accept") or ""):
        body = json.dumps(
            {"message": explanation + "<br /><br />\n\n\n", "code": f"{status} {phrase}",
             "title": phrase}
        ).encode()  # fmt: skip
        content_type = "application/json"
    else:
        body = (
            f"<html>\n <head>\n  <title>{status} {phrase}</title>\n </head>\n <body>\n"
            f"  <h1>{status} {phrase}</h1>\n  {explanation}<br /><br />\n\n\n\n </body>\n</html>"
        ).encode()
        content_type = "text/html; charset=UTF-8"
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("X-Openstack-Request-Id", f"req-{uuid.uuid4()}"),  # Glance's errors always carry one
        *extra,
    ]
    return _response_head(status, phrase, headers, ("length", len(body)), keep) + body


def _pieces(src: _Reader, framing: Framing) -> Iterator[memoryview]:
    """The payload of a body in blocks (chunk framing removed); each valid until the next."""
    if framing[0] == "length":
        remaining = framing[1]
        while remaining:
            piece = src.read_some(min(remaining, BLOCK))
            if not piece:
                raise _ProtocolError("connection closed before the end of the body")
            remaining -= len(piece)
            yield piece
    elif framing[0] == "chunked":
        while size := _chunk_size(src.readline()):
            while size:
                piece = src.read_some(min(size, BLOCK))
                if not piece:
                    raise _ProtocolError("connection closed in a chunk")
                size -= len(piece)
                yield piece
            src.readline()  # the CRLF after the chunk's data
        while src.readline() != b"\r\n":  # trailers, dropped
            pass
    elif framing[0] == "close":
        while piece := src.read_some(BLOCK):
            yield piece


def _chunk_size(line: bytes) -> int:
    """The size on a chunk's first line (extensions ignored)."""
    digits = line.split(b";", 1)[0].strip()
    try:
        return int(digits, 16)
    except ValueError:
        raise _ProtocolError(f"bad chunk size line {line!r}") from None


def _send_piece(sock: socket.socket, piece: memoryview, framing: Framing) -> None:
    if not piece:
        return  # an empty chunk would end a chunked body
    if framing[0] == "chunked":
        sock.sendall(b"%x\r\n" % len(piece))
        sock.sendall(piece)
        sock.sendall(b"\r\n")
    else:
        sock.sendall(piece)


def _copy_body(src: _Reader, framing: Framing, dst: socket.socket, limit: int | None) -> bool:
    """Forward a request body in its framing; False once ``limit`` bytes went and more remain."""
    sent = 0
    for piece in _pieces(src, framing):
        if limit is not None and sent + len(piece) > limit:
            _send_piece(dst, piece[: limit - sent], framing)
            return False
        _send_piece(dst, piece, framing)
        sent += len(piece)
    if framing[0] == "chunked":
        dst.sendall(b"0\r\n\r\n")
    return True


def _drain(src: _Reader, client: socket.socket, request: Request, framing: Framing) -> None:
    """Read and drop a request body the proxy answers itself, so the connection stays usable."""
    if framing[0] == "none":
        return
    _continue(client, request)
    for _ in _pieces(src, framing):
        pass


def _continue(client: socket.socket, request: Request) -> None:
    """Answer ``Expect: 100-continue`` before reading a body (Expect is not forwarded)."""
    if (request.header("Expect") or "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")


def _flush(sock: socket.socket) -> None:
    """Wait (briefly) until the peer has every byte sent so far: a reset discards unsent data."""
    deadline = time.monotonic() + FLUSH_TIMEOUT
    with contextlib.suppress(OSError):
        while struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)


def _reset(sock: socket.socket) -> None:
    """Abort the connection with RST (SO_LINGER 0), after the bytes already sent arrived."""
    _flush(sock)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _close_cleanly(sock: socket.socket) -> None:
    """End the connection with FIN: the peer reads every byte sent, then EOF."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sock.close()
