"""Shared fixtures: a tiny tokenizer and tiny saved models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_model, build_tokenizer

pytest_plugins = ["tests.s3_server"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 2-layer Llama saved as a Hugging Face safetensors directory, as a user would point at."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model("llama").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Keep tests from oversubscribing the CI machine's two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
