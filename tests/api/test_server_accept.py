"""How the relay takes connections (`relay.server.Listener`): every connection waiting on its socket at once, not
one per turn of the event loop as uvloop's own server does; and a socket it cannot take pauses taking."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from relay.server import Listener, RelayServer
from tests.helpers import running_server

WAITING = 100


@pytest.fixture(params=["uvloop", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """The listener's own tests, on uvloop (what `mj-relay serve` runs) and on asyncio's loop."""
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


def test_connections_that_came_while_the_loop_was_busy_are_all_taken_at_its_next_turn() -> None:
    servers: list[RelayServer] = []
    busy, connected = threading.Event(), threading.Event()

    async def hold(request: Request) -> JSONResponse:
        busy.set()
        connected.wait(15)  # the loop is held, as by a long stretch of work, while the clients connect
        open_connections = []
        for _ in range(6):  # the next turns of the loop
            await asyncio.sleep(0)
            open_connections.append(len(servers[0].server_state.connections))
        return JSONResponse(open_connections)

    clients: list[socket.socket] = []
    answer: list[httpx.Response] = []
    with running_server(Starlette(routes=[Route("/hold", hold)])) as (base, server):
        servers.append(server)
        try:
            asking = threading.Thread(target=lambda: answer.append(httpx.get(f"{base}/hold", timeout=30)))
            asking.start()
            assert busy.wait(15)
            port = int(base.rsplit(":", 1)[1])
            clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(WAITING)]
            connected.set()
            asking.join(30)
            # All the waiting connections are open within two turns (taken at the first, opened at the next); libuv
            # would have taken one per turn.
            assert json.loads(answer[0].content)[2:] == [1 + WAITING] * 4
        finally:
            connected.set()
            for client in clients:
                client.close()


class _Refusing(socket.socket):
    """A listening socket that cannot take its next connection, once: by default because the process is out of
    descriptors."""

    refusals = 1
    failure = errno.EMFILE

    def accept(self) -> tuple[socket.socket, Any]:
        if self.refusals:
            self.refusals -= 1
            raise OSError(self.failure, os.strerror(self.failure))
        return super().accept()


class _Opened(asyncio.Protocol):
    def __init__(self, opened: asyncio.Future[float], loop: asyncio.AbstractEventLoop) -> None:
        self.opened, self.loop = opened, loop
        self.told_to_shut_down = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.opened.done():
            self.opened.set_result(self.loop.time())
        transport.close()

    def shutdown(self) -> None:  # as uvicorn's protocols have it
        self.told_to_shut_down = True


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("failure", "paused"),
    [
        (errno.EMFILE, True),  # the process is out of descriptors: taking more now would fail alike
        (errno.EPROTO, False),  # a network error of that one connection, which accept(2) says to take as EAGAIN
    ],
)
async def test_a_failed_accept_pauses_taking_only_when_the_process_is_out_of_resources(
    failure: int, paused: bool
) -> None:
    loop = asyncio.get_running_loop()
    sock = _Refusing(socket.AF_INET, socket.SOCK_STREAM)
    sock.failure = failure
    sock.bind(("127.0.0.1", 0))
    opened: asyncio.Future[float] = loop.create_future()
    listener = Listener(loop, sock, lambda: _Opened(opened, loop), backlog=16, pause_s=0.2 if paused else 60)
    client = socket.socket()
    client.setblocking(False)
    try:
        started = loop.time()
        await loop.sock_connect(client, sock.getsockname())
        opened_at = await asyncio.wait_for(opened, 10)  # not paused: taken at once, not a minute later
        assert sock.refusals == 0
        if paused:
            # taken once the pause was over, not before (uvloop's clock counts whole milliseconds)
            assert opened_at - started >= 0.2 - 0.002
    finally:
        listener.close()
        await listener.wait_closed()
        client.close()
        sock.close()


@pytest.mark.anyio
async def test_a_closed_listener_no_longer_watches_its_socket_even_when_it_was_pausing() -> None:
    loop = asyncio.get_running_loop()
    for refusing in (False, True):
        sock = _Refusing(socket.AF_INET, socket.SOCK_STREAM)
        sock.refusals = int(refusing)
        sock.bind(("127.0.0.1", 0))
        opened: asyncio.Future[float] = loop.create_future()
        listener = Listener(loop, sock, lambda opened=opened: _Opened(opened, loop), backlog=16, pause_s=0.05)
        client = socket.socket()
        client.setblocking(False)
        try:
            if refusing:  # pausing: its resumption is due
                await loop.sock_connect(client, sock.getsockname())
                while sock.refusals:
                    await asyncio.sleep(0)
            listener.close()
            await asyncio.sleep(0.1)  # past the pause
            assert not loop.remove_reader(sock.fileno())  # nothing watches the socket
        finally:
            client.close()
            sock.close()


@pytest.mark.anyio
async def test_a_connection_taken_just_before_the_listener_closed_is_told_to_shut_down() -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    client = socket.socket()
    client.setblocking(False)
    opened: asyncio.Future[float] = loop.create_future()
    protocols: list[_Opened] = []

    def protocol() -> _Opened:
        protocols.append(_Opened(opened, loop))
        return protocols[-1]

    try:
        await loop.sock_connect(client, sock.getsockname())  # waiting in the backlog
        listener = Listener(loop, sock, protocol, backlog=16)
        listener._accept()  # taken, its opening to come at the next turn of the loop...
        assert listener._opening and not protocols
        listener.close()  # ...when the server stops
        await listener.wait_closed()
        assert [p.told_to_shut_down for p in protocols] == [True]
    finally:
        client.close()
        sock.close()


def test_on_a_loop_that_cannot_watch_a_socket_the_loops_own_server_serves_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"served": True})

    def cannot(*args: object) -> None:
        raise NotImplementedError  # as Windows' proactor loop

    # asyncio's own server watches its socket through the loop's private `_add_reader`
    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "add_reader", cannot)
    with running_server(Starlette(routes=[Route("/", hello)]), loop="asyncio") as (base, server):
        assert server.servers and not any(isinstance(listening, Listener) for listening in server.servers)
        assert httpx.get(f"{base}/", timeout=10).json() == {"served": True}
