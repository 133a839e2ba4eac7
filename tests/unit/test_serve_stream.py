"""The HTTP side of serving, without a server: sockets, the engine-to-loop mailbox, text."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from types import SimpleNamespace

import torch

from ostinato.data.tokenizer import train_tokenizer
from ostinato.serve.launch import bind, use_cpu_threads
from ostinato.serve.stream import Mailbox, text_of
from ostinato.serve.text import TextStream


def test_connections_to_the_bound_socket_send_without_nagle() -> None:
    """asyncio disables Nagle's algorithm only on sockets that say they are TCP; with proto 0
    every streamed chunk after the headers waited ~40 ms for the client's delayed ACK."""
    listener, url = bind("127.0.0.1", 0)
    nodelay: list[int] = []

    async def main() -> None:
        def accepted(reader, writer) -> None:
            sock = writer.get_extra_info("socket")
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        port = int(url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if nodelay:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert nodelay and nodelay[0] != 0


def test_the_mailbox_wakes_the_loop_once_per_batch_and_keeps_each_queue_in_order() -> None:
    loop = asyncio.new_event_loop()
    wakeups = []
    schedule = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: (wakeups.append(1), schedule(*args))
    mailbox = Mailbox(loop)
    queues = [asyncio.Queue() for _ in range(3)]
    emits = [mailbox(q) for q in queues]

    def engine_step() -> None:  # one engine step: a token for every sequence, on its thread
        for token in range(20):
            for emit in emits:
                emit(token, "length" if token == 19 else None)

    thread = threading.Thread(target=engine_step)
    thread.start()
    thread.join()
    assert len(wakeups) == 1  # nothing was delivered in between: one wake-up carries all 60

    loop.run_until_complete(asyncio.sleep(0))
    for queue in queues:
        got = [queue.get_nowait() for _ in range(queue.qsize())]
        assert got == [(t, "length" if t == 19 else None) for t in range(20)]
    emits[0](7, None)  # after a delivery, the next token asks for a wake-up again
    assert len(wakeups) == 2
    loop.run_until_complete(asyncio.sleep(0))
    assert queues[0].get_nowait() == (7, None)
    loop.close()


def test_tokens_that_arrive_together_give_the_text_and_usage_of_one_by_one() -> None:
    tokenizer = train_tokenizer(["hello world. #### 42 é and more after"], 300)
    ids = tokenizer.encode("hello world. #### 42 é and more", add_special_tokens=False).ids
    one_by_one = TextStream(tokenizer, stop=["####"])
    text = ""
    for token in ids:
        text += one_by_one.push(token)
        if one_by_one.stopped:
            break
    together = TextStream(tokenizer, stop=["####"])
    piece, reason = text_of([(t, None) for t in ids], together)
    assert (piece, reason) == (text, "stop") and together.ids == one_by_one.ids
    # Without stop strings: one decode for the lot, the finish reason after the last token.
    plain = TextStream(tokenizer)
    piece, reason = text_of([(t, None) for t in ids[:-1]] + [(ids[-1], "length")], plain)
    assert reason == "length" and piece == tokenizer.decode(ids) and plain.ids == ids
    assert text_of([(None, "stop")], TextStream(tokenizer)) == ("", "stop")


def test_a_cpu_server_leaves_one_core_to_its_http_loop(monkeypatch) -> None:
    chosen: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    cpu, gpu = (
        SimpleNamespace(device=torch.device("cpu")),
        SimpleNamespace(device=torch.device("cuda")),
    )
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    use_cpu_threads(cpu, 0)  # 4 cores this process may use: 3 for the model
    use_cpu_threads(cpu, 5)  # --threads 5 is taken as given
    use_cpu_threads(gpu, 0)  # an accelerator's host threads are left alone
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has no affinity call
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    use_cpu_threads(cpu, 0)  # one core: the model still gets a thread
    assert chosen == [3, 5, 1]
