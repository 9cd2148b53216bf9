"""A flag shared by the listener and its worker process whose ``set()`` never waits.

``multiprocessing.Event`` is a condition variable: its ``set()`` wakes each process sleeping in
``wait()`` and then waits until every one of them says it woke. A waiter that cannot say so (the
worker killed by SIGKILL, or by the kernel at ``MemoryMax=``, while it slept in ``wait()``, or a
MemoryError between its two steps) makes every later ``set()`` wait for ever. The listener set its
worker's wake-up flag on the commit thread, after each commit and before the ``250``s: one worker
killed while idle froze the listener, with the mail committed and no answer given (measured:
the client timed out, the service logged nothing, and never answered again).

Here the flag is a semaphore of at most one: ``set()`` posts it (``sem_post`` never blocks and
takes no lock), ``wait()`` takes it and puts it back, ``clear()`` takes it. A process that dies
anywhere in these leaves nothing half done.
"""

from __future__ import annotations

from typing import Any


class ProcessFlag:
    """``multiprocessing.Event``'s set/is_set/clear/wait, but ``set()`` never waits (see the module)."""

    def __init__(self, context: Any):
        self._posted = context.BoundedSemaphore(1)
        self._posted.acquire()  # not set

    def set(self) -> None:
        try:
            self._posted.release()
        except ValueError:  # already set: posted at most once
            pass

    def is_set(self) -> bool:
        return self._posted.get_value() > 0

    def clear(self) -> None:
        self._posted.acquire(False)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the flag is set (it stays set), False after *timeout* seconds."""
        if not self._posted.acquire(timeout=timeout):
            return False
        self.set()
        return True
