"""A TCP proxy on loopback in front of an HTTP service, whose faults a test switches while clients use it:

- ``pass``: bytes go through untouched;
- ``delay``: each request waits ``delay_s`` before it goes on (a slow dependency);
- ``status``: each request is answered ``503`` by the proxy, which then closes the connection;
- ``reset``: each request's connection is reset (TCP RST).

It knows nothing of the service behind it, so the same proxy stands in front of the Pinecone stand-in and the
GCS emulator, and the real clients meet the faults the way they would meet them on a network.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any, Literal

Mode = Literal["pass", "delay", "status", "reset"]
_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 27\r\n" \
       b"Connection: close\r\n\r\n{\"error\":\"injected fault\"}\n"


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.requests = 0  # request chunks seen, all modes
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: Mode, delay_s: float = 0.0) -> None:
        self.mode, self.delay_s = mode, delay_s

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        with self._lock:
            for c in self._conns:
                _close(c)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._conns += [client, upstream]
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                self.requests += 1
                mode = self.mode
                if mode == "delay":
                    time.sleep(self.delay_s)
                elif mode == "status":
                    client.sendall(_503)
                    break
                elif mode == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()  # closed at once with linger 0: an RST, not a FIN
                    break
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
