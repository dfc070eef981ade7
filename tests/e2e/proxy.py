"""A TCP proxy in front of a real server that "dies" after a set number of HTTP requests.

Used to cut the MLflow server off in the middle of a registration at a chosen point: after the
N-th request is forwarded, every connection is closed and new ones are refused, exactly what a
client sees when the server process goes away. It can also lose one answer and stay up (a blip:
the server did the work, the client never heard). No MLflow code is replaced or mocked.
"""

from __future__ import annotations

import re
import socket
import threading

REQUEST_LINE = re.compile(rb"(?:GET|POST|PUT|PATCH|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")


def _accept(listener: socket.socket, target_port: int, stop: threading.Event, pair) -> None:
    """Accept clients until `stop`; each gets its own connection to the target, handed to pair(client, upstream)."""
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except OSError:
            return
        pair(client, socket.create_connection(("127.0.0.1", target_port)))


def _shut(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DyingProxy:
    """Forwards to target_port until the first request whose path contains `cut_after` has been
    forwarded; the next request finds the server gone. The server's answers to the first request
    whose path contains each of `lose_answers_to` are dropped (connection closed instead)."""

    def __init__(self, target_port: int, cut_after: str | None = None, lose_answers_to: tuple[str, ...] = ()):
        self.cut_after = cut_after
        self.lose_answers_to = list(lose_answers_to)
        self.lost: list[str] = []
        self.paths: list[str] = []
        self.dead = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=_accept, args=(self.listener, target_port, self.dead, self._pair), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pair(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            self._conns += [client, upstream]
        conn = {"lose": False}  # shared by the two directions of one connection
        threading.Thread(target=self._pump, args=(client, upstream, True, conn), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False, conn), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool, conn: dict) -> None:
        try:
            while not self.dead.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if from_client:
                    for match in REQUEST_LINE.finditer(data):
                        with self._lock:
                            if self.cut_after is not None and any(self.cut_after in path for path in self.paths):
                                self.kill()
                                return
                            path = match.group(1).decode()
                            self.paths.append(path)
                            # HTTP/1.1 clients wait for an answer before the next request on a
                            # connection, so the next bytes from the server are this request's answer
                            lose = next((p for p in self.lose_answers_to if p in path), None)
                            if lose is not None:
                                self.lose_answers_to.remove(lose)
                                self.lost.append(path)
                                conn["lose"] = True
                elif conn["lose"]:
                    break  # the server answered; the client never hears it
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def kill(self) -> None:
        """The server is gone: close everything and refuse new connections."""
        self.dead.set()
        for s in [self.listener, *self._conns]:
            try:
                s.close()
            except OSError:
                pass


class AuthProxy:
    """Forwards to target_port, adding a basic-auth header to every request: a headless browser can be
    given no credentials for the requests a web UI makes itself (screenshots of the MLflow UI)."""

    def __init__(self, target_port: int, user: str, password: str):
        import base64

        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.header = f"Authorization: Basic {token}\r\n".encode()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(
            target=_accept, args=(self.listener, target_port, self.closed, self._pair), daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pair(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(REQUEST_LINE.sub(lambda m: m.group(0) + self.header, data) if from_client else data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
