"""Supervision: restart a failing child with backoff, escalate when it keeps failing.

A child is an async function that is expected to run until cancelled (or to
return when its work is done). If it raises, :func:`supervise` logs the error,
waits (exponential backoff) and starts it again. More than
``policy.max_failures`` failures within ``policy.window_s`` seconds raise
:class:`Escalation`, which takes the whole service down with a clear message:
a service that cannot persist or alert must not pretend to be healthy.

Cancellation is never caught; it ends the child and the supervisor alike.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
import trio

log = logging.getLogger("budget_actor.supervisor")


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    # Five quick failures in a minute means the fault is not transient
    # (a bug, a full disk); restarting forever would only hide it.
    max_failures: int = 5
    window_s: float = 60.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0


class Escalation(Exception):
    """A child failed too often; the service must stop."""


class Restarts:
    """The failure record of one supervised task: how long to wait before the
    next start, and when to give up."""

    def __init__(self, name: str, policy: RestartPolicy) -> None:
        self.name = name
        self.policy = policy
        self._failures: deque[float] = deque()

    def failed(self, exc: BaseException) -> float:
        """Record a failure; return the backoff before restarting.

        Raises :class:`Escalation` (chained to ``exc``) when the task failed
        more than ``max_failures`` times within ``window_s``.
        """
        policy, failures = self.policy, self._failures
        now = trio.current_time()
        failures.append(now)
        while failures and failures[0] < now - policy.window_s:
            failures.popleft()
        if len(failures) > policy.max_failures:
            raise Escalation(
                f"{self.name} failed {len(failures)} times in {policy.window_s:g}s;"
                f" last error: {type(exc).__name__}: {exc}"
            ) from exc
        # Backoff grows with the recent failures only, so a task that failed
        # once last week restarts at once.
        backoff = min(policy.backoff_initial_s * 2.0 ** (len(failures) - 1), policy.backoff_max_s)
        log.warning(
            "%s failed (%s: %s); restarting in %.1fs",
            self.name,
            type(exc).__name__,
            exc,
            backoff,
            exc_info=exc,
        )
        return backoff


async def supervise(
    name: str,
    child: Callable[[], Awaitable[None]],
    policy: RestartPolicy,
    on_restart: Callable[[str], None] | None = None,
) -> None:
    """Run ``child`` until it returns, restarting it when it raises.

    ``on_restart(name)`` is called (synchronously) before each restart, for
    the restart counters in health and metrics.
    """
    restarts = Restarts(name, policy)
    while True:
        try:
            await child()
            return
        except Exception as exc:
            backoff = restarts.failed(exc)
            if on_restart is not None:
                on_restart(name)
            await trio.sleep(backoff)
