"""Signals that stop a long native call (a merge) cleanly: the one place that handles them.

The Rust core polls Python's signal handlers between pieces of work
(``PyErr_CheckSignals``); a handler that raises makes it stop, remove its temporaries
and return, and the exception propagates. Python's default action for SIGTERM and
SIGHUP kills the process at once, leaving the temporaries behind, so for the length of
such a call :func:`stopping_on_signals` replaces the *default* actions of SIGINT,
SIGTERM and SIGHUP with a handler raising :class:`Interrupted`. Handlers the program
installed itself, and ignored signals (``nohup``), are left alone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupted", "exit_code", "stopping_on_signals"]

#: The signals handled, by name (SIGHUP does not exist on Windows).
_NAMES = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """A merge stopped by a signal; nothing was written under the output's name.

    A subclass of ``KeyboardInterrupt``, so code that treats Ctrl-C as a request to
    stop (``except KeyboardInterrupt``, or not catching it) treats SIGTERM and SIGHUP
    alike, and ``except Exception`` does not swallow it. ``signum`` is the signal's
    number, ``signal_name`` its name (``"SIGTERM"``).
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.signal_name = signal.Signals(self.signum).name
        super().__init__(f"interrupted by {self.signal_name}; nothing was written")


def exit_code(signum: int) -> int:
    """128 + the signal's number, as a shell reports a process the signal killed."""
    return 128 + int(signum)


def _raise(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def _replaceable(current: Any, signum: int) -> bool:
    """Only the default actions: not SIG_IGN, not the program's own handler, not one
    installed outside Python (``None``)."""
    if current is signal.SIG_DFL:
        return True
    return signum == signal.SIGINT and current is signal.default_int_handler


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (where
    they had their default action); the previous handlers are restored after. Off the
    main thread, where Python cannot set handlers, nothing changes."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in _NAMES:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            current = signal.getsignal(signum)
            if _replaceable(current, signum):
                previous[signum] = current
                signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
