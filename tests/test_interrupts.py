"""Ctrl-C routing (gemma_mlx/interrupts.py), in fresh processes: routed presses reach a main thread that is blocked
in a system call while other threads exist, every press is served once, and held_off delays them."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def run(body: str) -> str:
    code = textwrap.dedent('''
        import os, signal, threading, time
        from gemma_mlx.interrupts import held_off, route_to_main_thread
        assert route_to_main_thread()
        sleeper = threading.Thread(target=time.sleep, args=(30,), daemon=True)  # a thread that could take SIGINT
        sleeper.start()
        def press():
            os.kill(os.getpid(), signal.SIGINT)
    ''') + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_press_interrupts_a_blocking_wait_in_the_main_thread():
    out = run('''
        threading.Timer(0.2, press).start()
        t = time.time()
        try:
            os.read(os.pipe()[0], 1)  # blocks in read(2) until a signal handler raises
        except KeyboardInterrupt:
            print("interrupted", round(time.time() - t, 1))
    ''')
    assert out.split()[0] == "interrupted" and float(out.split()[1]) < 5


def test_each_press_is_served_once_by_the_handler_installed_then():
    out = run('''
        seen = []
        signal.signal(signal.SIGINT, lambda *a: seen.append(1))
        for _ in range(5):
            press()
            time.sleep(0.2)
        time.sleep(0.5)
        print(len(seen))
    ''')
    assert out.strip() == "5"


def test_held_off_delays_a_press_until_the_block_ends():
    out = run('''
        try:
            with held_off():
                press()
                time.sleep(0.5)
                print("inside, not interrupted")
            time.sleep(2)
            print("never reached")
        except KeyboardInterrupt:
            print("interrupted after")
    ''')
    assert out.splitlines()[:2] == ["inside, not interrupted", "interrupted after"]


def test_held_off_holds_a_sigterm_that_lands_on_another_thread():
    """The mask covers the main thread only; CPython would still run the handler there at once (the block stands in
    a recorder), and the held signal reaches the handler once, after the block."""
    out = run('''
        signal.signal(signal.SIGTERM, lambda *a: print("terminated"))
        with held_off():
            signal.pthread_kill(sleeper.ident, signal.SIGTERM)
            time.sleep(0.3)
            print("inside")
        print("after")
    ''')
    assert out.splitlines() == ["inside", "terminated", "after"]
