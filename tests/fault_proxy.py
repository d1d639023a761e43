"""A TCP fault proxy for tests: 127.0.0.1:<free port> -> an upstream (the moto S3 server).

Faults are switched at runtime from the test thread (every setting is read under one lock):

* pass-through: bytes are copied both ways.
* ``drop(n=..., p=...)``: a new connection is accepted and reset at once (RST, nothing forwarded):
  the next ``n`` connections, or each one with probability ``p`` (seeded ``random.Random``).
* ``drop_requests(p=..., match=...)``: on a live (keep-alive) connection, a new HTTP request is
  reset before anything is forwarded (with probability ``p`` or for the next ``n`` matching ones).
* ``drop_responses(n=..., match=...)``: the request is forwarded (the server applies it) and the
  connection is reset when its response arrives: the client cannot know whether it was applied
  (``configure(resp_drop_p=...)``: each request with probability p).
* ``delay(connect=..., request=...)``: each new connection waits ``connect`` seconds before it is
  forwarded; each request waits ``request`` seconds.
* ``down_on(match)``: pass-through until a matching request arrives, then ``down()`` (that request is
  reset): the endpoint dies at a chosen point of a run, e.g. the first write of a stage by a Ray worker.
* ``down()``: the listening socket is closed (connection refused) and every live connection is reset;
  ``passthrough()`` (or any other mode) listens again on the same port.

HTTP requests are recognised on the raw byte stream (no pipelining in boto): a chunk from the client
that follows a final response (or opens the connection) starts a new request (an interim
``100 Continue`` is passed through: the body that follows belongs to the same request); ``match`` is a regular
expression on its first line (``rb"^PUT /bucket/root/LATEST"``). Decisions under ``p`` come from one
seeded generator, but which connection draws which number depends on thread scheduling.
"""

from __future__ import annotations

import random
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_POLL_S = 0.05


@dataclass
class ProxyStats:
    connections: int = 0  # accepted by the proxy
    dropped_connections: int = 0
    dropped_requests: int = 0
    dropped_responses: int = 0
    delayed: int = 0
    requests: int = 0  # request starts seen (forwarded or dropped)
    request_lines: list[str] = field(default_factory=list)  # first line of each request seen


@dataclass
class _Faults:
    drop_n: int = 0
    drop_p: float = 0.0
    req_drop_n: int = 0
    req_drop_p: float = 0.0
    req_match: re.Pattern[bytes] | None = None
    resp_drop_n: int = 0
    resp_drop_p: float = 0.0
    resp_match: re.Pattern[bytes] | None = None
    connect_delay: float = 0.0
    request_delay: float = 0.0
    down_on: re.Pattern[bytes] | None = None
    down: bool = False


_INTERIM = re.compile(rb"^HTTP/1\.[01] 1\d\d [^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n")


def _strip_interim(data: bytes) -> bytes:
    """``data`` without leading interim (1xx) responses: what is left belongs to the final response."""
    while m := _INTERIM.match(data):
        data = data[m.end():]
    return data


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', not an orderly close."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    """``with FaultProxy(port) as p: p.drop(n=3) ...``; ``p.endpoint_url`` is what clients use."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", seed: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._faults = _Faults()
        self._rng = random.Random(seed)
        self.stats = ProxyStats()
        self.went_down: str | None = None  # the request that triggered down_on
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._live: set[_Conn] = set()
        self._threads: list[threading.Thread] = []
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._listen()
        t = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._close_listener()
            live = list(self._live)
        for c in live:
            c.kill()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.settimeout(_POLL_S)
        self.port = s.getsockname()[1]
        self._listener = s

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            finally:
                self._listener = None

    # ------------------------------------------------------------------ modes (thread-safe)

    def _set(self, down: bool = False, **kw: Any) -> None:
        with self._lock:
            self._faults = _Faults(down=down, **kw)
            if down:
                self._close_listener()
                live = list(self._live)
            else:
                live = []
                if self._listener is None and not self._stop.is_set():
                    self._listen()  # same port: SO_REUSEADDR
        for c in live:
            c.kill()

    def passthrough(self) -> None:
        self._set()

    def configure(self, drop_n: int = 0, drop_p: float = 0.0, req_drop_n: int = 0, req_drop_p: float = 0.0,
                  req_match: bytes | None = None, resp_drop_n: int = 0, resp_drop_p: float = 0.0,
                  resp_match: bytes | None = None, connect_delay: float = 0.0, request_delay: float = 0.0,
                  down_on: bytes | None = None) -> None:
        """Several faults at once (the single-fault methods below are shorthands)."""
        self._set(drop_n=drop_n, drop_p=drop_p, req_drop_n=req_drop_n, req_drop_p=req_drop_p,
                  req_match=re.compile(req_match) if req_match else None, resp_drop_n=resp_drop_n,
                  resp_drop_p=resp_drop_p, resp_match=re.compile(resp_match) if resp_match else None,
                  connect_delay=connect_delay, request_delay=request_delay,
                  down_on=re.compile(down_on) if down_on else None)

    def down_on(self, match: bytes) -> None:
        """Pass-through until a request matching ``match`` arrives; then go down (that request included)."""
        self.went_down = None
        self._set(down_on=re.compile(match))

    def drop(self, n: int = 0, p: float = 0.0) -> None:
        """Reset new connections at accept: the next ``n``, or each with probability ``p``."""
        self._set(drop_n=n, drop_p=p)

    def drop_requests(self, n: int = 0, p: float = 0.0, match: bytes | None = None) -> None:
        """Reset a connection when a (matching) request starts, before forwarding it."""
        self._set(req_drop_n=n, req_drop_p=p, req_match=re.compile(match) if match else None)

    def drop_responses(self, n: int = 1, match: bytes | None = None) -> None:
        """Forward the next ``n`` (matching) requests, then reset instead of returning their responses."""
        self._set(resp_drop_n=n, resp_match=re.compile(match) if match else None)

    def delay(self, connect: float = 0.0, request: float = 0.0) -> None:
        self._set(connect_delay=connect, request_delay=request)

    def down(self) -> None:
        """Refuse every new connection (listener closed) and reset the live ones."""
        self._set(down=True)

    def reset_live(self) -> None:
        """Reset every live connection (a proxy restart), keeping the current mode."""
        with self._lock:
            live = list(self._live)
        for c in live:
            c.kill()

    # ------------------------------------------------------------------ decisions

    def _on_accept(self) -> tuple[bool, float]:
        with self._lock:
            f = self._faults
            self.stats.connections += 1
            drop = False
            if f.drop_n > 0:
                f.drop_n -= 1
                drop = True
            elif f.drop_p > 0 and self._rng.random() < f.drop_p:
                drop = True
            if drop:
                self.stats.dropped_connections += 1
            elif f.connect_delay > 0:
                self.stats.delayed += 1
            return drop, f.connect_delay

    def _on_request(self, first_line: bytes) -> tuple[str, float]:
        """``("drop"|"drop_response"|"forward", delay)`` for a request starting with ``first_line``."""
        with self._lock:
            f = self._faults
            self.stats.requests += 1
            self.stats.request_lines.append(first_line.decode("latin-1", "replace"))
            if f.down_on is not None and f.down_on.search(first_line):
                self.went_down = first_line.decode("latin-1", "replace")
                trigger = True
            else:
                trigger = False
        if trigger:
            self.down()
            return "drop", 0.0
        with self._lock:
            f = self._faults
            if f.req_drop_n > 0 or f.req_drop_p > 0:
                if f.req_match is None or f.req_match.search(first_line):
                    if f.req_drop_n > 0:
                        f.req_drop_n -= 1
                        self.stats.dropped_requests += 1
                        return "drop", 0.0
                    if f.req_drop_p > 0 and self._rng.random() < f.req_drop_p:
                        self.stats.dropped_requests += 1
                        return "drop", 0.0
            if f.resp_match is None or f.resp_match.search(first_line):
                if f.resp_drop_n > 0:
                    f.resp_drop_n -= 1
                    self.stats.dropped_responses += 1
                    return "drop_response", f.request_delay
                if f.resp_drop_p > 0 and self._rng.random() < f.resp_drop_p:
                    self.stats.dropped_responses += 1
                    return "drop_response", f.request_delay
            return "forward", f.request_delay

    # ------------------------------------------------------------------ plumbing

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(_POLL_S)
                continue
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by down()/stop() meanwhile
                continue
            client.setblocking(True)
            drop, delay = self._on_accept()
            if drop:
                _reset(client)
                continue
            conn = _Conn(self, client, delay)
            with self._lock:
                self._live.add(conn)
            t = threading.Thread(target=conn.run, name="fault-proxy-conn", daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._live.discard(conn)


class _Conn:
    def __init__(self, proxy: FaultProxy, client: socket.socket, delay: float) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.delay = delay
        self._killed = threading.Event()

    def kill(self) -> None:
        self._killed.set()

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless killed/stopped meanwhile; False when the connection must go."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._killed.is_set() or self.proxy._stop.is_set():
                return False
            time.sleep(min(_POLL_S, max(0.0, end - time.monotonic())))
        return True

    def run(self) -> None:
        graceful = False
        try:
            graceful = self._run()
        except OSError:
            pass
        finally:
            for s in (self.client, self.upstream):
                if s is None:
                    continue
                if graceful:
                    try:
                        s.close()
                    except OSError:
                        pass
                else:
                    _reset(s)
            self.proxy._forget(self)

    def _run(self) -> bool:
        """Copy bytes until a fault (False: reset both sides) or an orderly close (True)."""
        if self.delay > 0 and not self._sleep(self.delay):
            return False
        self.upstream = socket.create_connection(self.proxy.upstream, timeout=10)
        self.upstream.setblocking(True)
        new_request, drop_response = True, False
        socks = [self.client, self.upstream]
        while not self._killed.is_set() and not self.proxy._stop.is_set():
            ready, _, _ = select.select(socks, [], [], _POLL_S)
            for s in ready:
                data = s.recv(65536)
                if not data:
                    # Orderly close from one side: close both (HTTP keep-alive ends here).
                    return True
                if s is self.client:
                    if new_request:
                        new_request = False
                        action, wait = self.proxy._on_request(data.split(b"\r\n", 1)[0])
                        if action == "drop":
                            return False
                        drop_response = action == "drop_response"
                        if wait > 0 and not self._sleep(wait):
                            return False
                    self.upstream.sendall(data)
                else:
                    final = _strip_interim(data)
                    if not final:  # "100 Continue" (boto sends Expect: 100-continue with PUT bodies)
                        self.client.sendall(data)
                        continue
                    if drop_response:
                        return False  # the server applied the request; the client never hears of it
                    new_request = True
                    self.client.sendall(data)
        return False
