import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # the one place tests name ../shared: import these constants, or use the fixtures
FIXTURES = SHARED / "fixtures"
MEDIA = FIXTURES / "media"
TOKENIZER = FIXTURES / "gemma4-tokenizer"  # the real Gemma 4 tokenizer files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (the repo expects ../shared beside it)")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory):
    """(torch model, checkpoint dir) of the default tiny random gemma4_unified model."""
    from hf_tiny import build_gemma4

    path = tmp_path_factory.mktemp("tiny_gemma4")
    return build_gemma4(path, seed=0), path


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    from hf_tiny import build_gemma3

    path = tmp_path_factory.mktemp("tiny_gemma3")
    return build_gemma3(path, seed=1), path
