"""A TCP proxy between agents and the broker that can slow the link down and corrupt bytes in flight.

It forwards raw bytes; it knows nothing of MQTT except where to aim: `corrupt(marker)` flips one
byte `offset` bytes after the next occurrence of `marker` in what the broker sends, once. A
corrupted chunk is thus one that left the controller intact and changed on the way, which is
what a chunk's own sha256 is for. `rate_bytes_per_s` paces what the broker sends to each client
so that a transfer lasts long enough to be interrupted.
"""

import contextlib
import socket
import threading
import time


class LinkProxy:
    def __init__(self, upstream_port: int, rate_bytes_per_s: float | None = None) -> None:
        self.upstream_port, self.rate_bytes_per_s = upstream_port, rate_bytes_per_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.corrupted = 0
        self._marker: bytes | None = None
        self._offset = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def corrupt(self, marker: bytes, offset: int) -> None:
        """Flip the byte `offset` bytes after the end of the next `marker` the broker sends."""
        with self._lock:
            self._marker, self._offset = marker, offset

    def close(self) -> None:
        self._running = False
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:  # the broker is down: the client sees a closed connection and retries
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_broker: bool) -> None:
        window = b""  # the tail of what passed, so that a marker split across reads is still found
        flip_at: int | None = None  # bytes still to pass before the one to flip
        try:
            while data := source.recv(1 << 16):
                if from_broker:
                    data, window, flip_at = self._maybe_corrupt(bytearray(data), window, flip_at)
                    if self.rate_bytes_per_s:
                        time.sleep(len(data) / self.rate_bytes_per_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _maybe_corrupt(
        self, data: bytearray, window: bytes, flip_at: int | None
    ) -> tuple[bytearray, bytes, int | None]:
        with self._lock:
            marker, offset = self._marker, self._offset
        if flip_at is None and marker is not None:
            seen = window + bytes(data)
            if (found := seen.find(marker)) >= 0:
                with self._lock:
                    self._marker = None  # once
                flip_at = found + len(marker) + offset - len(window)
            window = seen[-len(marker) :]
        if flip_at is not None:
            if flip_at < len(data):
                data[flip_at] ^= 0xFF
                self.corrupted += 1
                flip_at = None
            else:
                flip_at -= len(data)
        return data, window, flip_at
