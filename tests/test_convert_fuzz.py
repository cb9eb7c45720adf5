"""Seeded mutation fuzz of `convert` on Hugging Face checkpoints (tests/convert_fuzz.py builds the cases): every
case either converts to a model that loads and runs, or fails with a GemmaMLXError and leaves neither OUT nor a
temporary directory. Each case is bounded (gguf_fuzz.run_cases: a worker under RLIMIT_AS, a per-case deadline).
The GGUF side of the same rule is tests/test_gguf_hardening.py's campaigns, through the same worker."""

from __future__ import annotations

import pytest

from convert_fuzz import campaign, write_base
from gguf_fuzz import run_cases


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("convert_fuzz") / "base")


def check(outcomes) -> None:
    bad = [o for o in outcomes if o.ending not in ("error", "converted")]
    assert not bad, "\n\n".join(f"{o.case}: {o.ending}\n{o.detail}" for o in bad[:5])


def test_the_base_checkpoint_converts_and_loads(base, tmp_path):
    (outcome,) = run_cases([("base", base)], tmp_path)
    assert outcome.ending == "converted", outcome.detail


def test_seeded_mutations_convert_to_a_model_that_loads_or_fail_cleanly(base, tmp_path):
    outcomes = run_cases(campaign(base, tmp_path, 60, seed=7), tmp_path)
    check(outcomes)
    assert sum(o.ending == "error" for o in outcomes) > 20  # the mutations do reach the checks


@pytest.mark.slow
def test_seeded_mutation_campaign(base, tmp_path):
    check(run_cases(campaign(base, tmp_path, 1500, seed=2027), tmp_path))
