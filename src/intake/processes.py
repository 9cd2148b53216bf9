"""What intake's processes share about memory and start-up: glibc's malloc told to give large
buffers back, and spawning a child process without running our main script again in it.

Light on purpose (stdlib only): the listener, the worker and the parse helper all import it, and
each of them should hold only the modules it uses.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.machinery import ModuleSpec

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_large_buffers() -> None:
    """Have glibc's malloc give every buffer of 1 MiB or more its own mapping, returned to the
    system when freed. By default it raises that bound to the largest buffer freed so far: after
    one 25 MB message, the next ones' bytes came from the heap, which kept them (the parse helper
    2.6x a message instead of 2x; the worker, after ten, 6x instead of 2x). Every intake process
    that handles whole messages calls it at start. Elsewhere than glibc, nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)  # a fixed bound: no longer raised
    except (OSError, AttributeError):
        pass


@contextmanager
def main_left_alone() -> Iterator[None]:
    """Start a spawned process without running our main script again in it.

    spawn re-runs the parent's ``__main__`` script in the child (to find what it defines); under
    ``intake serve`` that is the console script, which imports the whole CLI: 2.7 s on a slow
    2-core machine, against 0.6 s for what the parse helper needs, and memory the child never
    gives back. A main module named as a package's ``__main__`` is left alone
    (``multiprocessing.spawn._fixup_main_from_name``), so for the start it is named so. Nothing
    intake's children run is defined in the main script."""
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is not None:  # run with -m: spawn decides by that name already
        yield
        return
    main.__spec__ = ModuleSpec("intake.__main__", None)
    try:
        yield
    finally:
        main.__spec__ = None
