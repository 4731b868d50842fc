"""A stop signal during set-up ends the process even when the main thread is blocked in C++.

A Python signal handler runs only when the main thread returns to the interpreter; a process hung in
process-group creation or a set-up collective (gloo/NCCL waiting for a peer) never does. The C-level handler
still writes the signal number to the wakeup fd (signal.set_wakeup_fd), and a thread reading that fd sees it.
While set-up is not done, it gives the main thread GRACE_S seconds to run its Python handler or reach the
training loop (which then saves and stops as usual); if it did neither, it calls `on_expire(signal name)` (rank 0 records STOPPED and releases the lease)
and exits with 128 + the signal number. Nothing is lost: set-up trains nothing.
"""
from __future__ import annotations

import os
import signal
import threading

GRACE_S = 10.0
_WATCHED = {int(getattr(signal, name)) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")}


class SetupWatchdog:
    def __init__(self, on_expire=None, grace_s: float = GRACE_S, handled=None):
        """handled(): has the main thread's Python handler seen the signal? Then it is not blocked in C++, and
        its own stop check (or the set-up timeout) ends the launch: the watchdog leaves it alone."""
        self.on_expire, self.grace_s, self.handled = on_expire, grace_s, handled
        self.done = threading.Event()
        self._read_fd = None

    def start(self) -> "SetupWatchdog":
        """Main thread only (set_wakeup_fd). Keeps any wakeup fd already set chained: none is in this process."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no watchdog
            os.close(r), os.close(w)
            return self
        self._read_fd, self._write_fd = r, w
        threading.Thread(target=self._watch, name="gpt-simple-setup-watchdog", daemon=True).start()
        return self

    def setup_done(self) -> None:
        """The main thread reached the training loop: its own stop check handles signals from now on."""
        self.done.set()

    def _watch(self) -> None:
        while not self.done.is_set():
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            signums = [b for b in data if b in _WATCHED]
            if not signums or self.done.is_set():
                continue
            if self.done.wait(self.grace_s):
                return
            if self.handled is not None and self.handled():
                return
            name = signal.Signals(signums[0]).name
            try:
                if self.on_expire is not None:
                    self.on_expire(name)
            finally:
                os._exit(128 + signums[0])
