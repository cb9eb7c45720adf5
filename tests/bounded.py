"""Fuzz campaigns with every case bounded: cases run in a worker subprocess under an address-space limit
(RLIMIT_AS), each reported as it starts and ends, and a case running past its timeout kills the worker.

A test calls ``run_campaign(script, kind, first, count)``; ``script`` run as ``python script KIND FIRST COUNT``
calls ``worker_loop(run_case, FIRST, COUNT, memory_limit)``. The only acceptable outcome of a case is a result or
a GemmaMLXError; anything else, a crash, or running out of the limits is a problem.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Callable


def worker_loop(run_case: Callable[[int], object], first_seed: int, count: int, memory_limit: int) -> None:
    """Runs run_case(seed) for each seed, printing {"start": seed} before and {"seed", "outcome"} after each."""
    import resource

    from gemma_mlx.errors import GemmaMLXError

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    for seed in range(first_seed, first_seed + count):
        print(json.dumps({"start": seed}), flush=True)
        try:
            problem = run_case(seed)
            outcome = f"CRASH {problem}" if isinstance(problem, str) else "ok"
        except GemmaMLXError as e:
            outcome = f"error: {type(e).__name__}"
        except BaseException as e:  # noqa: BLE001 — exactly what the fuzz is looking for
            outcome = f"CRASH {type(e).__name__}: {str(e)[:300]}"
        print(json.dumps({"seed": seed, "outcome": outcome}), flush=True)


def run_campaign(script: str, kind: str, first_seed: int, count: int, case_timeout: float = 30) -> list[str]:
    """Problems found by `count` cases of `kind` run by `script`: cases that raised anything but a GemmaMLXError
    (or reported a problem), and each case the worker died on (memory limit, crash, or past case_timeout s)."""
    problems: list[str] = []
    seed, end = first_seed, first_seed + count
    while seed < end:
        err_file = tempfile.TemporaryFile()  # a file, not a pipe: a chatty worker can never block on it
        proc = subprocess.Popen([sys.executable, script, kind, str(seed), str(end - seed)], stdout=subprocess.PIPE,
                                stderr=err_file, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        started, reason, pending = None, None, b""
        deadline = time.monotonic() + 3 * case_timeout  # the first case also pays for the worker's imports
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                proc.kill()
                reason = f"still running after {case_timeout} s"
                break
            chunk = os.read(proc.stdout.fileno(), 65536)  # raw reads: nothing hides in a buffer from select
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                record = json.loads(line)
                if "start" in record:
                    started = record["start"]
                    deadline = time.monotonic() + case_timeout
                else:
                    seed = record["seed"] + 1
                    if record["outcome"].startswith("CRASH"):
                        problems.append(f"{kind} seed {record['seed']}: {record['outcome']}")
        rc = proc.wait()
        proc.stdout.close()
        err_file.seek(0)
        err = err_file.read()[-2000:].decode(errors="replace")
        err_file.close()
        if rc == 0 and reason is None:
            if seed < end:
                problems.append(f"{kind}: the worker exited after seed {seed - 1}, before seed {end - 1}: {err}")
            break
        culprit = started if started is not None and started >= seed else seed
        problems.append(f"{kind} seed {culprit}: worker died ({reason or f'rc {rc}'}): {err.strip()[-500:]}")
        seed = culprit + 1  # carry on after the case that killed the worker
    return problems
