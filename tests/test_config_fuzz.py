"""Seeded mutation fuzz of a valid tiny checkpoint (config.json / generation_config.json values, safetensors header
bytes) loaded through gemma_mlx.load in a subprocess bounded by RLIMIT_AS and a timeout: only GemmaMLXError allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WORKER = r'''
import json, random, resource, shutil, sys, tempfile, traceback
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import gemma_mlx
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.tiny import write_demo_model
seed, cases = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
base = write_demo_model(Path(tempfile.mkdtemp()) / "base")
POOL = [-1, 0, 1, 2**31, 2**63, 10**7, 1e308, "abc", True, None, [], {}, [1, 2, 3], 0.5, 512]
def leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items(): yield from leaves(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x): yield from leaves(v, path + (i,))
    yield path
bad = []
for case in range(cases):
    d = Path(tempfile.mkdtemp()) / "m"
    shutil.copytree(base, d)
    kind = rng.choice(["config.json", "generation_config.json", "header"])
    if kind == "header":
        data = bytearray((d / "model.safetensors").read_bytes())
        n = int.from_bytes(data[:8], "little")
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, 8 + n)] = rng.randrange(256)
        (d / "model.safetensors").write_bytes(bytes(data))
    else:
        obj = json.loads((d / kind).read_text())
        path = rng.choice([p for p in leaves(obj) if p])
        parent = obj
        for k in path[:-1]: parent = parent[k]
        parent[path[-1]] = rng.choice(POOL)
        (d / kind).write_text(json.dumps(obj))
    try:
        g = gemma_mlx.load(d)
        g.generate("hi", max_tokens=2, temperature=0)
    except GemmaMLXError:
        pass
    except BaseException as e:
        bad.append(f"case {case} ({kind}): {type(e).__name__}: {e}")
    shutil.rmtree(d.parent, ignore_errors=True)
print(json.dumps(bad))
'''


def run_campaign(seed: int, cases: int, timeout: int) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(seed), str(cases)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"worker died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_seeded_mutations_give_only_typed_errors():
    assert run_campaign(seed=1, cases=40, timeout=300) == []


@pytest.mark.slow
def test_longer_mutation_campaign():
    assert run_campaign(seed=2, cases=600, timeout=3000) == []
