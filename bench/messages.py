"""message_counting_overhead: what library mode's message counting costs the application
(exporter/messages/), PUSH -> PULL of 100-byte messages over tcp loopback in one process,
the same two sockets counted and not counted in alternating windows (ABBA order) of one run.

- batched (the measure): each window sends `BATCH` messages, then receives them, until
  `per_window` messages: the pure cost of pyzmq's send and recv calls, which counting
  wraps (the worst case: nothing else in the loop).
- round trip (informational): each message is sent, then received before the next is
  sent: the loop waits for libzmq's I/O thread once per message, as an application
  waiting for its peer does.

Time per message, median over windows; the ratio is counted / not counted.

Counted can be faster than not counted: pyzmq's `Socket.send` is a Python function over
its compiled send (for `routing_id`/`group`), and the counting wrapper calls the compiled
send directly when those are not given. So the run also times a third mode, "direct": the
uncounted sockets' compiled send (`zmq.backend.Socket.send`) called the same way, and
reports counted - direct as `counting_cost_us`, what counting itself adds per message.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.backend

from exporter import messages

PAYLOAD = b"m" * 100
BATCH = 500  # under the pipe's HWM (1000 + 1000): a batch never blocks


@dataclass(frozen=True)
class Result:
    batched_ratio: float
    batched_us: dict[str, float]  # median µs per message, "off" and "on"
    round_trip_ratio: float
    round_trip_us: dict[str, float]
    windows: int
    counted: int  # messages the counted windows counted (sent), a check
    implementation: str  # exporter.messages.IMPLEMENTATION: "compiled" or "python"
    counting_cost_us: float  # median µs per message, counted - direct (batched)


Send = Callable[[bytes], object]


def _sender(push: zmq.Socket[bytes], mode: str) -> Send:
    """The send the loop calls: the socket's own, or ("direct") pyzmq's compiled one."""
    if mode == "direct":
        return functools.partial(zmq.backend.Socket.send, push)
    return push.send


def _batched(push: zmq.Socket[bytes], pull: zmq.Socket[bytes], n: int, mode: str) -> float:
    send, recv = _sender(push, mode), pull.recv
    start = time.perf_counter()
    for _ in range(n // BATCH):
        for _ in range(BATCH):
            send(PAYLOAD)
        for _ in range(BATCH):
            recv()
    return (time.perf_counter() - start) / (n // BATCH * BATCH)


def _round_trip(push: zmq.Socket[bytes], pull: zmq.Socket[bytes], n: int) -> float:
    send, recv = push.send, pull.recv
    start = time.perf_counter()
    for _ in range(n):
        send(PAYLOAD)
        recv()
    return (time.perf_counter() - start) / n


def run(windows: int, per_window: int) -> Result:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        for s in (pull, push):
            s.linger = 0
            s.rcvtimeo = s.sndtimeo = 10_000  # a lost message fails the bench, never hangs
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        _round_trip(push, pull, 200)  # connected, warm
        times: dict[str, dict[str, list[float]]] = {
            "batched": {"off": [], "on": [], "direct": []},
            "round_trip": {"off": [], "on": []},
        }
        counted = 0
        for i in range(windows):
            # ABBA: off, on, on, off, ... (direct, informational, after each pair)
            order = ("off", "on", "direct") if i % 2 == 0 else ("on", "off", "direct")
            for mode in order:
                counts = messages.count(push) if mode == "on" else None
                if counts is not None:
                    messages.count(pull)
                times["batched"][mode].append(_batched(push, pull, per_window, mode))
                if mode != "direct":
                    times["round_trip"][mode].append(_round_trip(push, pull, per_window // 10))
                if counts is not None:
                    counted += counts.sent
                    messages.uncount(push)
                    messages.uncount(pull)
        med = {
            kind: {mode: statistics.median(v) * 1e6 for mode, v in by_mode.items()}
            for kind, by_mode in times.items()
        }
        return Result(
            batched_ratio=med["batched"]["on"] / med["batched"]["off"],
            batched_us={k: round(v, 3) for k, v in med["batched"].items()},
            round_trip_ratio=med["round_trip"]["on"] / med["round_trip"]["off"],
            round_trip_us={k: round(v, 3) for k, v in med["round_trip"].items()},
            windows=windows,
            counted=counted,
            implementation=messages.IMPLEMENTATION,
            counting_cost_us=round(med["batched"]["on"] - med["batched"]["direct"], 3),
        )
    finally:
        pull.close()
        push.close()
        ctx.term()


if __name__ == "__main__":
    print(run(20, 20_000))
