"""Jobs: long work as generators, advanced a slice at a time by one :class:`JobRunner`.

A job is a generator that yields :class:`Progress` any number of times and then its result (any
other object; returning it works too). A job with nothing to report is a generator all the same
(``yield from ()`` before its work). Between two items the runner may stop, cancel or replace
it, so a job must leave the model as it found it at every ``yield`` (jobs only read it).

The runner has one slot per feature: a new job of a feature replaces (cancels) the one running.
It reports through ``emit(JobEvent)``: progress (every ``progress_interval`` seconds at most,
the first after one interval: a short job reports none, and repaints nothing while it runs), the
result, a cancellation, or an error with a message fit for the user. Qt-free and torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ntkviz.errors import NtkvizError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of a job's work (examples, chunks…)."""

    done: int
    total: int


@dataclass(frozen=True)
class JobEvent:
    """What a job did: ``kind`` is "progress" (payload :class:`Progress`), "result" (the result),
    "cancelled" (payload: the reason) or "error" (payload ``(title, message)``).
    ``generation`` is the requester's number for the request, returned as given."""

    feature: str
    generation: int
    kind: str
    payload: object = None


#: How long a job waits for work on a helper thread before it yields again (s).
POLL_SECONDS = 0.02


#: The helper thread of each kind of work (the function's name), the latest started.
_helpers: dict[str, threading.Thread] = {}


def on_helper_thread(fn: Callable, *args, progress: Progress):
    """Run ``fn(*args)`` on a daemon helper thread while the job yields ``progress`` every
    :data:`POLL_SECONDS` (``yield from`` it; it returns the result or raises the error). For one
    long numeric call that cannot yield itself (an eigen-decomposition, which releases the GIL);
    it must not touch the model. A job stopped meanwhile leaves the call to finish unseen; the
    next call of the same ``fn`` waits for it (yielding), so that they do not pile up."""
    key = getattr(fn, "__qualname__", repr(fn))
    previous = _helpers.get(key)
    while previous is not None and previous.is_alive():
        previous.join(POLL_SECONDS)
        yield progress
    box: dict = {}
    finished = threading.Event()

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the job
            box["error"] = e
        finally:
            finished.set()

    helper = _helpers[key] = threading.Thread(target=target, name="ntkviz-helper", daemon=True)
    helper.start()
    while not finished.wait(POLL_SECONDS):
        yield progress
    if "error" in box:
        raise box["error"]
    return box["result"]


def wait_for_helpers() -> None:
    """Wait until no helper thread computes any more (e.g. before the process ends)."""
    for helper in list(_helpers.values()):
        helper.join()


def describe_error(feature: str, e: BaseException) -> tuple[str, str]:
    """``(title, message)`` for the user: the error's own title for ntkviz errors, "<Feature>
    failed" for bad arguments, "Internal error" (logged with its traceback) otherwise."""
    if isinstance(e, NtkvizError):
        return e.title, str(e)
    if isinstance(e, ValueError):
        return f"{feature.replace('_', ' ').capitalize()} failed", str(e)
    log.error("%s failed", feature, exc_info=e)
    return "Internal error", f"{feature}: {type(e).__name__}: {e}"


@dataclass
class _Slot:
    generation: int
    job: Iterator
    priority: int
    last_progress: float  #: when progress was last reported (the start, at first)


class JobRunner:
    """Runs at most one job per feature, round-robin in order of ``priority`` (lower first)."""

    def __init__(
        self,
        emit: Callable[[JobEvent], None],
        clock: Callable[[], float] = time.perf_counter,
        progress_interval: float = 0.1,
    ):
        self._emit = emit
        self._clock = clock
        self._progress_interval = progress_interval
        self._slots: dict[str, _Slot] = {}

    @property
    def busy(self) -> bool:
        return bool(self._slots)

    def running(self, feature: str) -> bool:
        return feature in self._slots

    def start(self, feature: str, generation: int, job: Iterator, priority: int = 10) -> None:
        """Run ``job`` for ``feature``, replacing (cancelling) its running job."""
        self.cancel(feature, "replaced by a newer request")
        # the first progress after one interval: a short job shows none (no repaint mid-job)
        self._slots[feature] = _Slot(generation, job, priority, self._clock())

    def generation(self, feature: str) -> int | None:
        """The generation of ``feature``'s running job (None if none runs)."""
        slot = self._slots.get(feature)
        return None if slot is None else slot.generation

    def cancel(self, feature: str, reason: str = "cancelled") -> bool:
        """Cancel ``feature``'s job; False if none was running."""
        slot = self._slots.pop(feature, None)
        if slot is None:
            return False
        slot.job.close()
        self._emit(JobEvent(feature, slot.generation, "cancelled", reason))
        return True

    def cancel_all(self, reason: str, keep: set[str] = frozenset()) -> None:
        """Cancel every job but those of the features in ``keep``."""
        for feature in list(self._slots):
            if feature not in keep:
                self.cancel(feature, reason)

    def step(self, budget: float) -> None:
        """Advance every job by one item in turn, and again while ``budget`` seconds last (at
        least one round, so a budget of 0 advances each job once)."""
        deadline = self._clock() + budget
        while self._slots:
            for feature in sorted(self._slots, key=lambda f: self._slots[f].priority):
                if feature in self._slots:  # a job may have ended in this round
                    self._advance(feature)
            if self._clock() >= deadline:
                return

    def _advance(self, feature: str) -> None:
        slot = self._slots[feature]
        try:
            item = next(slot.job)
        except StopIteration as stop:
            del self._slots[feature]
            self._emit(JobEvent(feature, slot.generation, "result", stop.value))
            return
        except Exception as e:
            del self._slots[feature]
            self._emit(JobEvent(feature, slot.generation, "error", describe_error(feature, e)))
            return
        if isinstance(item, Progress):
            now = self._clock()
            if now - slot.last_progress >= self._progress_interval:
                slot.last_progress = now
                self._emit(JobEvent(feature, slot.generation, "progress", item))
            return
        del self._slots[feature]
        slot.job.close()
        self._emit(JobEvent(feature, slot.generation, "result", item))

    def close(self) -> None:
        """Drop every job silently (shutdown)."""
        for slot in self._slots.values():
            slot.job.close()
        self._slots.clear()
