"""The agent's timed inbox: a priority queue that hands each item to the worker no earlier than its
release time (a received frame's arrival plus the emulated delay, see ``node_agent.agent``) and as
little after it as the host allows.

A plain ``Condition.wait(timeout)`` wakes 0.1 ms late on average (timer slack, thread wake-up,
GIL hand-over), and every late wake-up is added to every hop of a token's critical path. So the
worker sleeps until ``SPIN_S`` before the release (with its timer slack lowered to 1 ns), then
yields in a short loop until the release. The loop drops the lock and the GIL on every turn, so
readers keep inserting frames meanwhile, and an earlier item inserted during the spin is served
first.
"""
from __future__ import annotations

import ctypes
import heapq
import threading
import time

SPIN_S = 150e-6  # wake this much before a release and yield until it is due
_PR_SET_TIMERSLACK = 29


def lower_timer_slack() -> bool:
    """Set the calling thread's timer slack to 1 ns (Linux; default 50 us). False if not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class TimedInbox:
    """``put(item, release)`` from any thread; ``get()`` (one consumer) blocks until the earliest
    item's release time (``time.time()`` clock) has come and returns it. Equal times: FIFO."""

    def __init__(self, spin_s: float = SPIN_S):
        self._heap: list = []
        self._n = 0
        self._cv = threading.Condition()
        self.spin_s = spin_s

    def put(self, item, release: float = 0.0) -> None:
        with self._cv:
            self._n += 1
            heapq.heappush(self._heap, (release, self._n, item))
            self._cv.notify()

    def get(self):
        with self._cv:
            while True:
                if not self._heap:
                    self._cv.wait()
                    continue
                wait = self._heap[0][0] - time.time()
                if wait <= 0:
                    return heapq.heappop(self._heap)[2]
                if wait > self.spin_s:
                    self._cv.wait(wait - self.spin_s)
                else:  # the last stretch: let readers in, then look again
                    self._cv.release()
                    try:
                        time.sleep(0)
                    finally:
                        self._cv.acquire()

    def __len__(self) -> int:
        with self._cv:
            return len(self._heap)
