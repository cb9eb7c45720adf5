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


@contextmanager
def held_off():
    """Ctrl-C and SIGTERM wait until the block ends (a rename that must not be cut in half), routed or not."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM} | ({CARRIER} if CARRIER is not None else set())
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
