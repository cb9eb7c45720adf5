"""The `gemma-mlx` command (also `python -m gemma_mlx`): set up the process, then run the CLI in cli.py.

Imports nothing heavy before ``route_interrupts_to_main_thread``: that must run while this is the only thread.
"""

from __future__ import annotations

import signal
import threading


def route_interrupts_to_main_thread() -> bool:
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
                    signal.pthread_kill(main, signal.SIGUSR1)
                    served.wait(0.05)

    signal.signal(signal.SIGUSR1, serve_a_press)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=watch, name="gemma-mlx-sigint", daemon=True).start()
    return True


def main() -> None:
    """On Linux, first re-execute with a fast BLAS preloaded when one is installed; then the CLI."""
    from .platform import reexec_with_fast_blas

    reexec_with_fast_blas()  # before the routing: an exec keeps the blocked mask but not the watcher
    route_interrupts_to_main_thread()
    from .cli import cli

    cli()


if __name__ == "__main__":
    main()
