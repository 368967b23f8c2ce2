"""A TCP proxy in front of PostgreSQL that ends a backend at a chosen moment: when its client
sends a statement containing a marker (a table name, `COMMIT`), the proxy has the server
terminate that backend (`pg_terminate_backend`, as an operator, a failover or a pooler would),
waits until it is gone, and only then passes the statement on. The client sees its connection
die exactly there, after any pre-ping it made has passed.

Only backends of the proxy's own database with the given `application_name` are ever ended.
Connect through it without TLS (`sslmode=disable`), so the statements can be seen.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress

import psycopg

from harness.processes import free_port


class PgProxy:
    def __init__(
        self,
        admin_dsn: str,
        database: str,
        application_name: str,
        upstream: tuple[str, int] = ("127.0.0.1", 5432),
    ) -> None:
        self.admin_dsn, self.database, self.application_name = admin_dsn, database, application_name
        self.upstream = upstream
        self.port = free_port()
        self.terminated: list[str] = []  # the marker that ended each backend
        self._lock = threading.Lock()
        self._marker = b""
        self._remaining = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False

    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}?sslmode=disable"

    def end_backend_on(self, marker: str, times: int = 1) -> None:
        """End the backend of the next `times` statements that contain `marker`."""
        with self._lock:
            self._marker, self._remaining = marker.encode(), times

    def start(self) -> PgProxy:
        self._admin = psycopg.connect(self.admin_dsn, autocommit=True)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._admin.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _take(self, chunk: bytes) -> bytes | None:
        with self._lock:
            if self._remaining > 0 and self._marker and self._marker in chunk:
                self._remaining -= 1
                return self._marker
        return None

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        """Client to server, ending the backend before a marked statement reaches it."""
        with suppress(OSError):
            while chunk := client.recv(65536):
                if (marker := self._take(chunk)) is not None:
                    # Recorded first: the client hears of the termination before it returns.
                    self.terminated.append(marker.decode())
                    try:
                        self._terminate(server.getsockname()[1])
                    except Exception as exc:  # the connection dies all the same, by our hand
                        self.terminated.append(f"terminate failed: {exc}")
                        client.close()
                        server.close()
                        return
                server.sendall(chunk)
        with suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        """Server to client, including the server's last words (the FATAL of a termination)."""
        with suppress(OSError):
            while chunk := server.recv(65536):
                client.sendall(chunk)
        for end in (client, server):
            with suppress(OSError):
                end.close()

    def _terminate(self, client_port: int) -> None:
        with self._lock:  # one admin connection, opened at start, for every termination
            ended = self._admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE client_port = %s AND datname = %s AND application_name = %s",
                (client_port, self.database, self.application_name),
            ).fetchall()
        if ended != [(True,)]:
            self.terminated.append(f"no backend on port {client_port}: {ended}")
