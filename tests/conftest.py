"""Shared pytest fixtures. The data and process helpers they use live in tests/helpers/."""

from pathlib import Path

import pytest
from helpers.backends import BACKENDS
from helpers.data import copy_experiment, prepared_experiment, tokdata_experiment


@pytest.fixture(name="tokdata_experiment")
def tokdata_experiment_fixture(tmp_path: Path):
    """Factory: ``make(n=300, **sections) -> config path`` writes ``n`` synthetic pairs as
    train.src/train.tgt (and 20-pair valid/test files) under tmp_path and a config that reads
    them, with a tiny tokenizer; ``sections`` are merged over the defaults."""

    def make(n: int = 300, **sections) -> Path:
        return tokdata_experiment(tmp_path, n, **sections)

    return make


@pytest.fixture(scope="session")
def trainkit_prepared(tmp_path_factory) -> dict:
    """Made once per session: 300 synthetic pairs (20 valid), a 120-piece tokenizer and the
    prepared data under ``run/`` (helpers.data.prepared_experiment). Returns the config as a dict."""
    return prepared_experiment(tmp_path_factory.mktemp("trainkit"))


@pytest.fixture
def trainkit_experiment(trainkit_prepared, tmp_path):
    """Factory: ``make(name="run", **sections) -> config path``: a copy of the prepared
    experiment in ``tmp_path/name`` and its config, ``sections`` merged over the defaults."""

    def make(name: str = "run", **sections) -> Path:
        return copy_experiment(trainkit_prepared, tmp_path / name, tmp_path / f"{name}.yaml", **sections)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each test that takes it runs with mtkit's own search (torch) and with CTranslate2
    (skipped where ctranslate2 is not installed)."""
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine threads only wait
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
