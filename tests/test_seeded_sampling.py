"""``mtkit translate --sampling --seed`` gives the same output every run, on several threads too."""

import pytest
import torch
from helpers.data import random_checkpoint, tokdata_pairs
from typer.testing import CliRunner

from mtkit.cli import app


@pytest.fixture
def restore_threads():
    """``--threads`` sets torch's thread count for the whole test process."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_seeded_sampling_is_reproducible_on_two_threads(trainkit_prepared, tmp_path, backend, restore_threads):
    model = random_checkpoint(trainkit_prepared, tmp_path)
    source = tmp_path / "in.txt"
    source.write_text("".join(src + "\n" for src, _ in tokdata_pairs(120, seed=5)), encoding="utf-8")
    # Small batches, so that the two threads (CTranslate2's inter_threads) have many to share.
    args = ["translate", "-m", str(model), "-i", str(source), "--backend", backend, "--sampling", "--top-k", "0",
            "--threads", "2", "--batch-sentences", "4"]

    def run(seed: int) -> str:
        result = CliRunner().invoke(app, [*args, "--seed", str(seed)])
        assert result.exit_code == 0, result.output
        return result.stdout

    first = run(3)
    assert len(first.splitlines()) == 120
    assert [run(3) for _ in range(2)] == [first, first]
    assert run(4) != first
