"""Ctrl-C for a process with many threads: every SIGINT reaches the main thread, and critical steps hold it off.

Imports nothing but the standard library: ``route_to_main_thread`` must run while the process has one thread.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

# The signal the watcher hands a SIGINT to the main thread with (route_to_main_thread).
CARRIER = getattr(signal, "SIGUSR1", None)


def route_to_main_thread() -> bool:
    """Make every Ctrl-C reach the main thread, also while it waits for a line in readline.

    Two things lose a terminal's SIGINT at the chat prompt (about one press in three, measured). The kernel may
    hand it to any thread that does not block it, and MLX, OpenBLAS and tokenizers start threads of their own;
    and CPython's readline loop only looks at a signal that interrupts its select(), so one that lands while it
    is redrawing the line is noticed at the next Enter. Here SIGINT is blocked in this thread, and so in every
    thread started after it (threads inherit their creator's mask); one watcher takes each SIGINT with sigwait
    and signals the main thread with SIGUSR1, again every 50 ms until the main thread has served that press,
    so one signal always finds select() waiting. Serving a press runs the SIGINT handler installed at that
    moment (KeyboardInterrupt by default, the chat's stop flag while it answers); presses are served one by one,
    in order. Returns False where the platform lacks these calls (Windows), which keeps Python's own handling.
    """
    if not all(hasattr(signal, f) for f in ("pthread_sigmask", "sigwait", "pthread_kill", "SIGUSR1")):
        return False
    main = threading.main_thread().ident
    presses = {"taken": 0, "served": 0}
    served = threading.Condition()

    def serve_a_press(signum, frame):
        with served:
            if presses["served"] >= presses["taken"]:
                return  # a resend that arrived after its press was served
            presses["served"] += 1
            served.notify_all()
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt

    def watch():
        while True:
            signal.sigwait({signal.SIGINT})
            with served:
                presses["taken"] += 1
                press = presses["taken"]
                while presses["served"] < press:
                    signal.pthread_kill(main, CARRIER)
                    served.wait(0.05)

    signal.signal(CARRIER, serve_a_press)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=watch, name="gemma-mlx-sigint", daemon=True).start()
    return True


class Terminated(BaseException):
    """A SIGTERM, raised in the main thread while ``terminate_raises`` is active, so that cleanup runs as it does
    for Ctrl-C. Like KeyboardInterrupt it is no Exception: ``except Exception`` does not swallow it."""

    exit_code = 128 + int(signal.SIGTERM)  # the shell's code for "killed by SIGTERM": 143


@contextmanager
def terminate_raises():
    """Within the block, SIGTERM raises Terminated in the main thread instead of ending the process at once.

    Python's default for SIGTERM kills the process before any ``finally`` runs (a conversion's temporary
    directory stayed behind). CPython runs Python-level handlers in the main thread whichever thread the kernel
    hands the signal to, so MLX's and OpenBLAS's threads need no mask for this. The SIGINT and SIGTERM handlers
    in place before the block are back after it, also where ignore_interrupts was called inside (a process that
    runs the CLI in-process, like the tests, keeps its Ctrl-C). Outside the main thread the block changes nothing
    (only the main thread may install handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT),
                signal.SIGTERM: signal.signal(signal.SIGTERM, raise_terminated)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_interrupts() -> None:
    """Ctrl-C and SIGTERM are ignored until the enclosing terminate_raises block ends: for work that is done and
    cannot be undone (a conversion whose model is in place), so that a late press cannot make it report a
    failure. Main thread only; a routed press then finds SIG_IGN and is dropped."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


@contextmanager
def held_off():
    """Ctrl-C and SIGTERM wait until the block ends (a rename that must not be cut in half), routed or not.

    The mask holds off what is aimed at the main thread (SIGINT, SIGTERM, and the routed presses' carrier). A
    process-directed signal may still land on one of MLX's or OpenBLAS's threads, which do not block SIGTERM,
    and CPython then runs its handler in the main thread at once, inside the block: so the block also stands in
    a recorder for the SIGINT and SIGTERM handlers. At the end every signal recorded is raised again, once each,
    in order, for the handler in place then: the previous one, or one the block installed itself (a conversion
    that has put its model in place sets interrupts to be ignored).
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM} | ({CARRIER} if CARRIER is not None else set())
    recorded: list[int] = []
    previous: dict[int, object] = {}

    def record(signum, frame):
        recorded.append(signum)

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, record)
        yield
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is record:  # not replaced inside the block
                signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for signum in recorded:
            _deliver(signum)


def _deliver(signum: int) -> None:
    """Run what the handler now installed for signum does (raise_signal would leave a SIGINT that routing blocks
    pending on this thread, where the watcher never sees it)."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)
