"""The interface every model family offers search, translation and export (``mtkit.models``)."""

import pytest
import torch

from mtkit.config import ModelConfig
from mtkit.models import ARCHITECTURES, build_model
from mtkit.vocab import EOS_ID

FAMILIES = [
    ("encoder_decoder", {"size": "tiny"}, True),
    ("decoder_only", {"size": "tiny_decoder_only", "target_positions": "restart"}, False),
    ("decoder_only", {"size": "tiny_decoder_only", "target_positions": "continue"}, False),
]


def test_every_registered_family_is_covered():
    assert {arch for arch, _, _ in FAMILIES} == set(ARCHITECTURES)


@pytest.mark.parametrize(("arch", "settings", "has_encoder"), FAMILIES)
def test_longest_source_leaves_room_for_the_target(arch, settings, has_encoder):
    """``max_source_length()`` subwords and their EOS encode and leave the target's BOS a
    position; one subword more does not fit."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, max_positions=16, **settings), 30, 30).eval()
    assert model.has_encoder is has_encoder

    def source(subwords: int) -> torch.Tensor:
        return torch.tensor([[5] * subwords + [EOS_ID]])

    longest = model.max_source_length()
    with torch.inference_mode():
        model.encode(source(longest))
        assert int(model.positions_left(source(longest))[0]) >= 1
        try:
            model.encode(source(longest + 1))
        except ValueError:
            return  # the source alone is beyond the position table
        assert int(model.positions_left(source(longest + 1))[0]) < 1
