"""A scheduler's stop (SIGTERM: Dagster's run termination, Kubernetes), Ctrl-C (SIGINT) or a closed terminal
(SIGHUP) ends `lorafleet` cleanly: the rows already finished are committed, the output lock is released, one
line says so, and the exit code is 128 + the signal's number (143, 130, 129), as a shell reports it."""
import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class RunInterrupted(BaseException):
    """A stop signal arrived. Raised between engine steps while generating, at once anywhere else. A
    BaseException, as KeyboardInterrupt is: no `except Exception` on the way may swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While entered (in the main thread), the stop signals raise RunInterrupted, except inside `between_steps()`:
    there the first one only sets `requested`, so that the step loop stops at the next step boundary and commits
    what finished. A second signal always raises at once. Not entered (Dagster, tests), it never requests a stop:
    an interrupt there arrives as an exception, which commits the finished rows and releases the lock the same way."""

    def __init__(self):
        self.signum: int | None = None
        self._deferring = False
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not (first and self._deferring):
            raise RunInterrupted(signum)

    def requested(self) -> bool:
        return self.signum is not None

    @contextmanager
    def between_steps(self):
        """Defer a first signal to the loop's own check; on leaving, raise RunInterrupted if one came."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.signum is not None:
            raise RunInterrupted(self.signum)
