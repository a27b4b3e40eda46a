"""The direct output channel (worker.channel) and RayEngineClient reading through it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pdserve.shared.errors import EngineDeadError
from pdserve.shared.protocol import EngineInfo, EngineRequest, OutputDelta
from pdserve.shared.roles import Role
from pdserve.worker.channel import ChannelClosed, ChannelRefused, OutputChannel, read_batches
from pdserve.worker.client import RayEngineClient


def _delta(rid: str, text: str, finished: bool = False) -> OutputDelta:
    return OutputDelta(rid, 0, [7], text, finish_reason="length" if finished else None, request_finished=finished)


async def test_batches_cross_the_channel_whole_and_in_order():
    outbox: asyncio.Queue = asyncio.Queue()
    channel = OutputChannel(outbox, "127.0.0.1")
    address = await channel.start()
    for i in range(3):
        outbox.put_nowait(_delta("r", f"t{i}"))
    stream = read_batches(address)
    first = await stream.__anext__()
    assert [d.text for d in first] == ["t0", "t1", "t2"]  # everything waiting goes in one frame
    assert first[0] == _delta("r", "t0")
    outbox.put_nowait(_delta("r", "end", finished=True))
    assert (await stream.__anext__())[0].request_finished
    await stream.aclose()
    await channel.close()


async def test_the_channel_listens_inside_the_configured_port_range():
    from pdserve.kv_transfer.ports import listen

    taken = listen("127.0.0.1", None)  # a port someone else holds: the channel takes the next one
    low = taken.getsockname()[1]
    channels = [OutputChannel(asyncio.Queue(), "127.0.0.1", (low, low + 20)) for _ in range(2)]
    try:
        ports = [(await c.start()).port for c in channels]
        assert len(set(ports)) == 2 and all(low < p <= low + 20 for p in ports)
    finally:
        taken.close()
        for c in channels:
            await c.close()


async def test_a_wrong_secret_is_refused_and_a_closed_channel_ends_the_reader():
    outbox: asyncio.Queue = asyncio.Queue()
    channel = OutputChannel(outbox, "127.0.0.1")
    address = await channel.start()
    with pytest.raises(ChannelRefused):
        await read_batches(dataclasses.replace(address, secret="0" * len(address.secret))).__anext__()
    reader = read_batches(address)
    waiting = asyncio.create_task(reader.__anext__())
    await asyncio.sleep(0.05)
    await channel.close()  # as the actor's process going away closes its socket
    with pytest.raises(ChannelClosed):
        await waiting
    port = address.port
    with pytest.raises(ChannelRefused):
        await read_batches(dataclasses.replace(address, port=port)).__anext__()


class _Method:
    def __init__(self, fn):
        self.remote = fn


class ChannelActor:
    """An EngineWorker handle whose outputs come over a real channel; `alive` is what info() answers."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.channel = OutputChannel(self.outbox, "127.0.0.1")
        self.alive = True
        self.aborted: list[str] = []
        self.output_channel = _Method(self.channel.start)
        self.submit = _Method(self._noop)
        self.abort = _Method(self._abort)
        self.info = _Method(self._info)
        self.outputs = _Method(self._no_ray)

    async def _noop(self, *args) -> None:
        return None

    async def _abort(self, ids: list[str]) -> None:
        self.aborted.extend(ids)

    async def _info(self):
        if not self.alive:
            raise RuntimeError("actor died")
        return None

    def _no_ray(self):
        raise AssertionError("the client should read the channel, not Ray's stream")


def _client(actor) -> RayEngineClient:
    return RayEngineClient(actor, EngineInfo("mixed-0", Role.MIXED, "m", 128, 16, 64))


async def _collect(client, rid):
    return [d.text async for d in client.generate(EngineRequest(rid, [1, 2], None))]


async def test_client_reads_the_channel_and_reopens_it_while_the_actor_lives():
    from pdserve.shared.errors import EngineError

    actor = ChannelActor()
    client = _client(actor)
    a = asyncio.create_task(_collect(client, "a"))
    await asyncio.sleep(0.05)
    actor.outbox.put_nowait(_delta("a", "a1"))
    await asyncio.sleep(0.05)
    await actor.channel.close()  # the connection breaks; the actor still answers
    with pytest.raises(EngineError, match="output channel broke"):  # its deltas may be lost: it fails...
        await asyncio.wait_for(a, 5)
    assert actor.aborted == ["a"]  # ...and is aborted in the engine, which frees its blocks
    b = asyncio.create_task(_collect(client, "b"))  # the instance serves on, over a reopened channel
    await asyncio.sleep(0.05)
    actor.outbox.put_nowait(_delta("b", "b1", finished=True))
    assert await asyncio.wait_for(b, 5) == ["b1"]
    assert client.channel_reconnects == 1 and client._dead is None  # not taken for dead
    await client.close()
    await actor.channel.close()


async def test_channel_gone_with_its_actor_fails_waiting_requests_as_dead():
    actor = ChannelActor()
    client = _client(actor)
    waiting = asyncio.create_task(_collect(client, "w"))
    await asyncio.sleep(0.05)
    actor.alive = False
    await actor.channel.close()
    with pytest.raises(EngineDeadError, match="actor died"):
        await asyncio.wait_for(waiting, 5)
    assert not (await client.stats()).healthy
    await client.close()
