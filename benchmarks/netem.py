"""A TCP proxy that adds round-trip delay and caps bandwidth, to emulate a wide-area link on loopback.

Each direction delivers a chunk `rtt / 2` after it arrived, and no faster than `mbit_s` allows;
ordering is kept. It runs its own event loop in a thread so a benchmark can sit in front of a body
server without root or network namespaces.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time


class DelayProxy:
    def __init__(self, upstream_port: int, rtt_ms: float, mbit_s: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.one_way = rtt_ms / 2000.0
        self.bytes_per_s = mbit_s * 125_000 if mbit_s else None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def cancel_all() -> None:
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        except asyncio.CancelledError:  # the proxy is stopping: not an error of this connection
            for w in (writer, up_writer):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        link_free = 0.0

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(deliver())
        while True:
            data = await reader.read(1 << 16)
            now = time.perf_counter()
            if self.bytes_per_s and data:
                link_free = max(link_free, now) + len(data) / self.bytes_per_s
                due = link_free + self.one_way
            else:
                due = now + self.one_way
            queue.put_nowait((due, data))
            if not data:
                break
        await task
