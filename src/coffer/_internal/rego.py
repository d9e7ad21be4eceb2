"""One thread for every regorus engine in the process.

A regorus ``Engine`` is bound to the thread that created it: using it, or even dropping the last
reference to it, on another thread makes the binding panic. Thread-local engines are not enough,
because an engine is dropped wherever the garbage collector happens to release it. So all engines
are created, used and dropped on a single worker thread, and Python objects elsewhere hold only
keys (policy digests) into registries that only that thread touches.

``run(fn)`` executes ``fn`` on the worker and returns its result (or raises its exception, with the
worker's tracebacks detached so no frame holding an engine travels to another thread). Callers must
never return an engine from ``fn``. Each module keeps its own registry and registers a cleanup that
empties it on the worker at interpreter exit.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Task = tuple[Callable[[], Any], list[tuple[bool, Any]], threading.Event]


class _Worker:
    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cleanups: list[Callable[[], None]] = []

    def _started(self) -> threading.Thread:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="coffer-rego", daemon=True)
                self._thread.start()
                atexit.register(self._at_exit)
            return self._thread

    def run(self, fn: Callable[[], T]) -> T:
        thread = self._started()
        if threading.current_thread() is thread:
            return fn()
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        self._tasks.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if ok:
            result: T = value
            return result
        raise value

    def add_cleanup(self, cleanup: Callable[[], None]) -> None:
        with self._lock:
            self._cleanups.append(cleanup)

    def _loop(self) -> None:
        while True:
            fn, box, done = self._tasks.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:
                _detach_tracebacks(exc)
                box.append((False, exc))
            finally:
                del fn
                done.set()

    def _at_exit(self) -> None:
        def clean() -> None:
            for cleanup in self._cleanups:
                cleanup()

        self.run(clean)


def _detach_tracebacks(exc: BaseException) -> None:
    seen: set[int] = set()
    current: BaseException | None = exc
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)


_WORKER = _Worker()


def run(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the regorus thread and return its result."""
    return _WORKER.run(fn)


def add_cleanup(cleanup: Callable[[], None]) -> None:
    """Register a function run on the regorus thread at exit (to drop a module's engines there)."""
    _WORKER.add_cleanup(cleanup)
