"""Pushes to WebSocket subscribers: one task writes each state to everyone.

The fan-out (``runtime/fanout.py``) releases spend states, paced by load and
encoded once. :class:`Pushes`, one task for the whole server, frames each
released state once and writes the same bytes to every subscriber
synchronously (:meth:`FrameWriter.write_now`: one ``write`` call each, no
task switch per subscriber), :data:`CHUNK` subscribers at a time with a
scheduler pass in between, so that a dispatcher's tasks keep running during a
round. It reports the time it spent to the fan-out, which spaces the next
release by it.

A subscriber that cannot take a state at once (its connection is busy with
another write, its peer is behind, or it is TLS) gets it from its own
:class:`Pusher` task, which waits for its socket and sends the newest state
it was handed; older ones it was handed meanwhile are skipped. That task also
sends the subscriber's first state and its alerts, in order, and closes the
connection when the subscription ends (1008 if it stopped reading alerts,
1012 if the service is restarting). A subscriber that never reads ends up
with a task blocked in a write, and is dropped by the keepalive.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio

from ..core.wire import encode
from ..runtime.fanout import Fanout, Published, Subscription
from .wsframes import FrameWriter, text_frame

# Subscribers written per scheduler pass. A write costs 15-80 µs on the
# 2-core machine of docs/performance.md (the kernel delivers on loopback in
# the writer's time), so a dispatcher's task waits at most a millisecond or
# two for its next turn during a round.
CHUNK = 32
# What handing a state to a subscriber's own task costs the event loop (a
# wake-up, two scheduler passes, an awaited write): measured at 25-35 µs on
# the 2-core machine of docs/performance.md. Charged to the fan-out with the
# time measured in the synchronous writes.
TASK_PUSH_S = 30e-6


class Pushes:
    """The WebSocket server's subscribers, and the task that writes to them."""

    def __init__(self, fanout: Fanout) -> None:
        self._fanout = fanout
        # Insertion-ordered: a round writes to subscribers in the order they came.
        self._pushers: dict[Pusher, None] = {}

    def __len__(self) -> int:
        return len(self._pushers)

    def add(self, pusher: Pusher) -> None:
        self._pushers[pusher] = None

    def discard(self, pusher: Pusher) -> None:
        self._pushers.pop(pusher, None)

    async def run(self) -> None:
        """Write every released state to every subscriber; runs until cancelled."""
        fanout = self._fanout
        number = 0
        clock = time.perf_counter
        while True:
            published = await fanout.released_after(number)
            number = published.number
            frame = text_frame(published.json())
            pushers = list(self._pushers)
            for start in range(0, len(pushers), CHUNK):
                if start:
                    # Let every other runnable task (the dispatcher's) go first.
                    await trio.lowlevel.checkpoint()
                began = clock()
                handed = 0
                for pusher in pushers[start : start + CHUNK]:
                    if not pusher.offer(published, frame):
                        handed += 1
                fanout.charge(clock() - began + handed * TASK_PUSH_S)


class Pusher:
    """One WebSocket subscriber: what was pushed to it, and its own task."""

    __slots__ = ("_subscription", "_want", "_writer", "pushed")

    def __init__(self, writer: FrameWriter, subscription: Subscription) -> None:
        self._writer = writer
        self._subscription = subscription
        # The newest state handed to this subscriber's task, with its frame.
        self._want: tuple[Published, bytes] | None = None
        #: Number of the newest state written (or being written) to it.
        self.pushed = 0

    def offer(self, published: Published, frame: bytes) -> bool:
        """From the push task: write ``frame`` now if possible (True), else
        hand it to this subscriber's task (False). Never awaits."""
        if published.number <= self.pushed:
            return True
        # A state handed over earlier must not be overtaken by a newer one
        # written directly: the task will send the newest.
        if self._want is None and self._writer.write_now(frame):
            self.pushed = published.number
            return True
        self._want = (published, frame)
        self._subscription.wake()
        return False

    async def run(self, pushes: Pushes, close: Callable[[int, str], Awaitable[None]]) -> None:
        """Send the first state, then join the round writes; send alerts and
        handed-over states until the subscription ends, then ``close`` the
        connection with the reason.

        Raises ``ConnectionClosed`` if the connection closes meanwhile.
        """
        subscription, writer = self._subscription, self._writer
        first = subscription.first
        # Written before joining the rounds, so no older state follows it.
        await writer.send(text_frame(first.json()))
        self.pushed = first.number
        pushes.add(self)
        try:
            while True:
                alert = subscription.take_alert()
                if alert is not None:
                    await writer.send(text_frame(encode(alert)))
                    continue
                want = self._want
                if want is not None:
                    self._want = None
                    published, frame = want
                    if published.number > self.pushed:
                        await writer.send(frame)
                        self.pushed = published.number
                    continue
                if subscription.closed:
                    if subscription.overflowed:
                        await close(1008, "subscriber is not reading its alerts")
                    else:
                        # The actor ended (stop or restart): close, so the
                        # client reconnects and subscribes again.
                        await close(1012, "service restarting; subscribe again")
                    return
                await subscription.wait()
        finally:
            pushes.discard(self)
