"""RabbitMQ for tests and benches: a virtual host of their own on the machine's RabbitMQ (quorum
queues cannot be redeclared as classic ones, nor the reverse, so runs must not share one), and a
TCP proxy in front of it that can stop forwarding, as a hung broker does, without touching the
real server. `rabbitmqctl` needs root, which tests and CI have here."""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
from contextlib import suppress
from typing import Any

from harness.processes import free_port, wait_until

AMQP_PORT = 5672


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class RabbitVhost:
    """A virtual host named `cdw-<prefix>-<random>`, user guest, deleted by `stop`.

    Offers what the tests use of `harness.processes.RedisServer`: `url`, `kind`, `broker_env()`
    (what a worker or an API needs in its environment) and `drained()`."""

    kind = "amqp"

    def __init__(self, prefix: str = "test", port: int = AMQP_PORT) -> None:
        self.name = f"cdw-{prefix}-{secrets.token_hex(4)}"
        self.port = port
        self.url = self.url_on(port)

    def url_on(self, port: int) -> str:
        """The vhost's URL through another port (a proxy in front of the server)."""
        return f"amqp://guest:guest@127.0.0.1:{port}/{self.name}"

    def start(self) -> RabbitVhost:
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def stop(self) -> None:
        with suppress(RuntimeError, subprocess.TimeoutExpired):
            rabbitmqctl("delete_vhost", self.name)

    def broker_env(self) -> dict[str, str]:
        return {"BROKER_URL": self.url}

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue of the vhost: type, arguments, messages (ready + unacked), unacked."""
        out = rabbitmqctl(
            "list_queues", "-p", self.name, "name", "type", "messages",
            "messages_unacknowledged", "arguments",
        )  # fmt: skip
        found: dict[str, dict[str, Any]] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) < 5 or parts[0] == "name":
                continue
            found[parts[0]] = {
                "type": parts[1],
                "messages": int(parts[2]),
                "unacked": int(parts[3]),
                "arguments": parts[4],
            }
        return found

    def drained(self, queue: str = "dualwrite.sync") -> bool:
        """No message of `queue` waits, and none is delivered but unacked."""
        info = self.queues().get(queue)
        return info is not None and info["messages"] == 0


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream`. `hang()` stops forwarding both ways and keeps
    every connection open, new ones included (they are accepted, then hear nothing): a broker
    that is hung, not down. `resume()` forwards again."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", AMQP_PORT)) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def hang(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        for sock in [self._listener, *self._sockets]:
            with suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._flowing.wait()
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        self._sockets.append(server)
        threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        with suppress(OSError):
            while chunk := source.recv(65536):
                self._flowing.wait()
                if self._closed:
                    break
                target.sendall(chunk)
        for end in (source, target):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def wait_answers(vhost: RabbitVhost, timeout: float = 30) -> None:
    """Until the vhost accepts an AMQP connection."""

    def answers() -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", vhost.port)) == 0

    wait_until(answers, timeout, 0.2, what=f"RabbitMQ on port {vhost.port}")
