"""Ctrl-C for command-line runs: the first one always ends the run within a deadline.

Python runs signal handlers only in the main thread, between bytecodes; a stage that blocks
the event loop in C code (a long torch op, a ``time.sleep``) would delay them indefinitely,
and asyncio's own handler cancels only the tasks that still turn. Here the C-level handler
writes the signal to a pipe (:func:`signal.set_wakeup_fd`) that a thread reads, whatever the
main thread does:

1. first SIGINT/SIGTERM: the run is cancelled in its event loop (stages stop, tear down,
   files are closed), and a timer starts;
2. if the process is still running ``grace`` seconds later, or on a second signal, it exits
   at once with status 130 (143 for SIGTERM), after saying what it was waiting for.

Outputs stay valid at every moment (the WAV sink keeps a correct header after each write),
so the hard exit loses at most the audio not yet written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

__all__ = ["InterruptGuard", "exit_code"]


def exit_code(signum: int) -> int:
    """The shell's status for a process ended by ``signum`` (130 for SIGINT)."""
    return 128 + signum


class InterruptGuard:
    """Use around a run on the main thread::

        with InterruptGuard(grace=1.5) as guard:
            anyio.run(main, guard)   # main calls guard.attach(pipeline.cancel) in its loop

    ``describe()`` (optional) says what the run is busy with, for the hard-exit message.
    Outside the main thread the guard does nothing (signals go to the main thread).
    """

    def __init__(self, grace: float = 1.5, describe: Callable[[], str] | None = None,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.grace = grace
        self.describe = describe
        self.signum: int | None = None  # the first signal received
        self._exit = exit
        self._cancel: Callable[[], None] | None = None
        self._fds: tuple[int, int] | None = None
        self._old: dict[int, object] = {}
        self._old_wakeup = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    def attach(self, cancel: Callable[[], None]) -> None:
        """Call from inside the event loop: ``cancel`` runs there on the first signal."""
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another backend: a thread waits for its loop to take the call
            import anyio.from_thread
            import anyio.lowlevel

            token = anyio.lowlevel.current_token()

            def in_loop() -> None:
                def call() -> None:
                    with contextlib.suppress(Exception):  # the loop ended: nothing to cancel
                        anyio.from_thread.run_sync(cancel, token=token)

                threading.Thread(target=call, daemon=True).start()
        else:
            def in_loop() -> None:
                with contextlib.suppress(RuntimeError):  # a closed loop: nothing to cancel
                    loop.call_soon_threadsafe(cancel)  # never blocks this thread

        with self._lock:
            self._cancel = in_loop
            pending = self.signum is not None
        if pending:
            cancel()

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._fds = (r, w)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="omniframe-interrupts",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fds is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        r, w = self._fds
        self._fds = None
        with contextlib.suppress(OSError):
            os.write(w, b"\0")  # wakes the watcher: it stops
        if self._thread is not None:
            self._thread.join(1.0)
        os.close(w)
        os.close(r)

    @staticmethod
    def _on_signal(signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: nothing (the watcher thread acts), so that no
        KeyboardInterrupt lands in the middle of a stage."""

    def _watch(self) -> None:
        assert self._fds is not None
        r = self._fds[0]
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            for signum in data:
                if signum == 0:
                    return
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self._received(signum)

    def _received(self, signum: int) -> None:
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = signum
            cancel = self._cancel
        if not first:
            self._hard_exit("a second interrupt")
            return
        timer = threading.Timer(self.grace, self._hard_exit, args=(f"{self.grace:g} s",))
        timer.daemon = True
        timer.start()
        if cancel is not None:
            cancel()

    def _hard_exit(self, why: str) -> None:
        busy = ""
        if self.describe is not None:
            try:
                busy = f"; still busy: {self.describe()}"
            except Exception:
                busy = ""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        msg = f"interrupted (the run did not stop within {why}{busy}; exiting now)\n"
        if why == "a second interrupt":
            msg = f"interrupted (second interrupt{busy}; exiting now)\n"
        with contextlib.suppress(OSError):
            os.write(2, msg.encode())
        self._exit(exit_code(self.signum or signal.SIGINT))
