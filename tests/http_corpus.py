"""Malformed and ambiguous HTTP/1.1 requests, and a raw client that reports what a server
did with each: the statuses it answered, and whether it closed the connection.

Each case says what a correct server may do with it (RFC 9112): `REFUSE` (a 4xx, then the
connection closed, nothing handled), `ONCE` (handled exactly once, with the body meant),
or either, where the RFC leaves the choice to the server.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

REFUSE = "refuse"  # answered >= 400 (sluiceway: 4xx or 501) and closed, nothing handled
ONCE = "once"
TWICE = "twice"  # two pipelined requests, each handled once, in order

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
PATH = b"/v1/chat/completions"


def _head(*lines: bytes, version: bytes = b"HTTP/1.1", eol: bytes = b"\r\n") -> bytes:
    start = b"POST " + PATH + b" " + version
    return eol.join((start, b"Host: 127.0.0.1", b"Content-Type: application/json", *lines,
                     b"", b""))


def _chunked(body: bytes = BODY, ext: bytes = b"") -> bytes:
    return b"%x%b\r\n%b\r\n0\r\n\r\n" % (len(body), ext, body)


CL = b"Content-Length: %d" % len(BODY)
CLOSE = b"Connection: close"
SMUGGLED = b"GET /admin/backends HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    allowed: frozenset[str]  # what a correct server may do
    split: bool = False  # send it one byte at a time


def case(name: str, raw: bytes, *allowed: str, split: bool = False) -> Case:
    return Case(name, raw, frozenset(allowed), split)


CASES = [
    case("valid, Content-Length", _head(CL, CLOSE) + BODY, ONCE),
    case("valid, chunked", _head(b"Transfer-Encoding: chunked", CLOSE) + _chunked(), ONCE),
    case("valid, split byte by byte", _head(CL, CLOSE) + BODY, ONCE, split=True),
    case("valid, chunked with an extension",
         _head(b"Transfer-Encoding: chunked", CLOSE) + _chunked(ext=b";name=value"), ONCE),
    case("Content-Length then Transfer-Encoding (smuggling)",
         _head(CL, b"Transfer-Encoding: chunked", CLOSE) + _chunked(), REFUSE),
    case("Transfer-Encoding then Content-Length (smuggling)",
         _head(b"Transfer-Encoding: chunked", CL, CLOSE) + _chunked(), REFUSE),
    case("two different Content-Length values",
         _head(CL, b"Content-Length: 5", CLOSE) + BODY, REFUSE),
    case("two equal Content-Length values", _head(CL, CL, CLOSE) + BODY, REFUSE, ONCE),
    case("a Content-Length list", _head(b"Content-Length: %d, %d" % (len(BODY), len(BODY)),
                                        CLOSE) + BODY, REFUSE, ONCE),
    case("negative Content-Length", _head(b"Content-Length: -1", CLOSE) + BODY, REFUSE),
    case("Content-Length with a sign", _head(b"Content-Length: +%d" % len(BODY), CLOSE)
         + BODY, REFUSE),
    case("Transfer-Encoding: xchunked", _head(b"Transfer-Encoding: xchunked", CLOSE)
         + _chunked(), REFUSE),
    case("Transfer-Encoding: chunked, identity",
         _head(b"Transfer-Encoding: chunked, identity", CLOSE) + _chunked(), REFUSE),
    case("Transfer-Encoding: identity, chunked",
         _head(b"Transfer-Encoding: identity, chunked", CLOSE) + _chunked(), REFUSE),
    case("Transfer-Encoding: chunked, chunked",
         _head(b"Transfer-Encoding: chunked, chunked", CLOSE) + _chunked(), REFUSE),
    case("Transfer-Encoding with trailing spaces",
         _head(b"Transfer-Encoding: chunked   ", CLOSE) + _chunked(), ONCE, REFUSE),
    case("Transfer-Encoding in capitals", _head(b"Transfer-Encoding: CHUNKED", CLOSE)
         + _chunked(), ONCE),
    case("Transfer-Encoding folded onto a second line (obs-fold)",
         _head(b"Transfer-Encoding:", b" chunked", CLOSE) + _chunked(), REFUSE),
    case("an obs-fold header", _head(CL, b"X-Note: one", b" two", CLOSE) + BODY, REFUSE, ONCE),
    case("space before the colon", _head(b"Content-Length : %d" % len(BODY), CLOSE) + BODY,
         REFUSE),
    case("bare LF line ends", _head(CL, CLOSE, eol=b"\n") + BODY, REFUSE, ONCE),
    case("bare CR in a header value", _head(CL, b"X-Note: a\rb", CLOSE) + BODY, REFUSE),
    case("NUL in a header value", _head(CL, b"X-Note: a\x00b", CLOSE) + BODY, REFUSE),
    case("a control byte in a header name", _head(CL, b"X-No\x01te: a", CLOSE) + BODY,
         REFUSE),
    case("invalid chunk size", _head(b"Transfer-Encoding: chunked", CLOSE)
         + b"zz\r\n" + BODY + b"\r\n0\r\n\r\n", REFUSE),
    case("oversize chunk size", _head(b"Transfer-Encoding: chunked", CLOSE)
         + b"ffffffffffffffffffff\r\n" + BODY + b"\r\n0\r\n\r\n", REFUSE),
    case("chunk extension with a bare LF", _head(b"Transfer-Encoding: chunked", CLOSE)
         + b"%x;a\nb\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY), REFUSE),
    case("chunk without its CRLF", _head(b"Transfer-Encoding: chunked", CLOSE)
         + b"%x\r\n%bXX0\r\n\r\n" % (len(BODY), BODY), REFUSE),
    case("chunked in HTTP/1.0", _head(b"Transfer-Encoding: chunked", version=b"HTTP/1.0")
         + _chunked(), REFUSE, ONCE),
    case("no Host in HTTP/1.1", _head(CL, CLOSE).replace(b"Host: 127.0.0.1\r\n", b"")
         + BODY, REFUSE),
    case("two Host headers", _head(CL, b"Host: other", CLOSE) + BODY, REFUSE),
    case("bad characters in the method", _head(CL, CLOSE).replace(b"POST", b"PO(ST", 1)
         + BODY, REFUSE),
    case("a request after Connection: close", _head(CL, CLOSE) + BODY + SMUGGLED, ONCE),
    case("two pipelined requests with bodies", _head(CL) + BODY + _head(CL, CLOSE) + BODY,
         TWICE),
    case("a request smuggled in a body a bad length hides",
         _head(b"Content-Length: 0", b"Content-Length: %d" % len(SMUGGLED), CLOSE)
         + SMUGGLED, REFUSE),
]


@dataclass(frozen=True)
class Outcome:
    statuses: tuple[int, ...]
    closed: bool  # the server closed the connection (rather than our timeout ending it)

    @property
    def verdict(self) -> str:
        """What the server did, in the cases' terms (or `other`)."""
        ok = tuple(s for s in self.statuses if s < 400)
        if not self.statuses:
            return "no answer" + (", closed" if self.closed else "")
        if not ok and self.closed:  # 4xx, or nginx's 501 for a coding it does not know
            return REFUSE
        if self.statuses == (200,):
            return ONCE
        if self.statuses == (200, 200):
            return TWICE
        return "other"

    def __str__(self) -> str:
        shown = ",".join(map(str, self.statuses)) or "-"
        return f"{shown}{' close' if self.closed else ''}"


def exchange(port: int, raw: bytes, split: bool = False, timeout_s: float = 3.0) -> Outcome:
    """Send `raw` to 127.0.0.1:port and read responses until the server closes or is
    silent for `timeout_s` (or the responses for every request sent are complete)."""
    expected = raw.count(b" HTTP/1.")  # request lines (and the smuggled one)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        if split:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(raw)):
                sock.sendall(raw[i:i + 1])
                if i % 64 == 0:
                    time.sleep(0.001)  # separate segments, not one coalesced write
        else:
            sock.sendall(raw)
        data, closed = b"", False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            if _responses(data)[1] >= expected:
                break  # every request sent was answered in full; did it close too?
        if not closed:
            closed = _closes_soon(sock)
    return Outcome(tuple(_responses(data)[0]), closed)


def _responses(data: bytes) -> tuple[list[int], int]:
    """The statuses of the responses in `data`, and how many of them are complete."""
    statuses: list[int] = []
    whole, pos = 0, 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        match = re.match(rb"HTTP/1\.[01] (\d{3})", data[pos:pos + 12])
        if end < 0 or not match:
            break
        statuses.append(int(match.group(1)))
        head, body_at = data[pos:end].lower(), end + 4
        length = re.search(rb"\ncontent-length: *(\d+)", head)
        if length:
            pos = body_at + int(length.group(1))
        elif b"transfer-encoding: chunked" in head:
            close = data.find(b"\r\n0\r\n\r\n", body_at - 2)
            pos = len(data) + 1 if close < 0 else close + 7
        else:
            pos = len(data) + 1  # delimited by the close
        if pos <= len(data):
            whole += 1
    return statuses, whole


def _closes_soon(sock: socket.socket, within_s: float = 0.3) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
