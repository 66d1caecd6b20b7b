import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkit.batching import TokenizedCorpus, epoch_batches, pack, padding_ratio, sorted_batches
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID


def random_corpus(n: int, seed: int = 0, longest: int = 40) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    src = [list(rng.integers(4, 100, rng.integers(1, longest))) for _ in range(n)]
    tgt = [list(rng.integers(4, 100, rng.integers(1, longest))) for _ in range(n)]
    return TokenizedCorpus.from_lists(src, tgt)


def test_collate_places_bos_eos_and_padding():
    corpus = TokenizedCorpus.from_lists([[5, 6, 7], [8]], [[9], [10, 11]])
    batch = corpus.batch(np.array([0, 1]))
    assert batch.src.tolist() == [[5, 6, 7, EOS_ID], [8, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 9, PAD_ID], [BOS_ID, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS_ID, PAD_ID], [10, 11, EOS_ID]]
    assert batch.target_tokens == 5
    assert batch.real_tokens == 5 + 6 and batch.padded_tokens == 8 + 6


@given(st.lists(st.integers(1, 50), min_size=1, max_size=200), st.integers(50, 400),
       st.none() | st.integers(1, 40))
@settings(max_examples=80, deadline=None)
def test_pack_covers_everything_once_within_budget(sizes, max_tokens, max_items):
    sizes = np.array(sizes)
    order = np.argsort(sizes, kind="stable")
    batches = pack(sizes, order, max_tokens, max_items=max_items)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(sizes)))
    for ids in batches:
        assert len(ids) * sizes[ids].max() <= max_tokens
        assert max_items is None or len(ids) <= max_items
    # Greedy: adding the next pair to a batch would have broken a limit.
    for ids, following in zip(batches, batches[1:], strict=False):
        assert (len(ids) + 1) * sizes[following[0]] > max_tokens or len(ids) == max_items


def test_pack_refuses_a_pair_larger_than_the_budget():
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([3, 90]), np.array([0, 1]), 50)


def test_epochs_are_seeded_shuffled_and_complete():
    corpus = random_corpus(500)
    first = epoch_batches(corpus, 400, seed=1, epoch=1)
    again = epoch_batches(corpus, 400, seed=1, epoch=1)
    second = epoch_batches(corpus, 400, seed=1, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert [a.tolist() for a in first] != [b.tolist() for b in second]
    for batches in (first, second):
        assert sorted(np.concatenate(batches).tolist()) == list(range(500))
        assert all(len(ids) * corpus.sizes[ids].max() <= 400 for ids in batches)
    # The order is shuffled: batch lengths do not ascend.
    longest = [corpus.sizes[ids].max() for ids in first]
    assert longest != sorted(longest)


def test_bucketing_keeps_padding_low():
    corpus = random_corpus(2000, longest=60)
    bucketed = padding_ratio(corpus, epoch_batches(corpus, 1000, seed=1, epoch=1))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(corpus))
    unsorted = padding_ratio(corpus, [order[i : i + 20] for i in range(0, len(order), 20)])
    assert bucketed < 0.35 < unsorted  # src and tgt lengths are independent here, so some remains


def test_sorted_batches_pinned():
    # Padded sizes (longer side + EOS/BOS) 4, 3, 4, 2, 6, 3: ties go to the shorter source,
    # then the shorter target, then the lower index; each batch is filled greedily up to 8.
    src = [[5] * 3, [5] * 2, [5], [5], [5] * 5, [5] * 2]
    tgt = [[6], [6], [6] * 3, [6], [6], [6] * 2]
    corpus = TokenizedCorpus.from_lists(src, tgt)
    assert [b.tolist() for b in sorted_batches(corpus, 8)] == [[3, 1], [5, 2], [0], [4]]


@pytest.mark.parametrize("seed", range(5))
def test_sorted_batches_ascend_within_budget_and_cover_everything_once(seed):
    corpus = random_corpus(300, seed=seed)
    batches = sorted_batches(corpus, 200)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(corpus)))
    assert np.all(np.diff(corpus.sizes[flat]) >= 0)
    assert all(len(ids) * corpus.sizes[ids].max() <= 200 for ids in batches)
    assert [b.tolist() for b in sorted_batches(corpus, 200)] == [b.tolist() for b in batches]


def test_from_dataset_reads_arrow_columns_even_after_select():
    datasets = pytest.importorskip("datasets")
    src = [[5, 6], [7], [8, 9, 10]]
    tgt = [[11], [12, 13], [14]]
    dataset = datasets.Dataset.from_dict({"src_ids": src, "tgt_ids": tgt})
    subset = dataset.select([2, 0])
    corpus = TokenizedCorpus.from_dataset(subset)
    assert corpus.src_lens.tolist() == [3, 2] and corpus.tgt_lens.tolist() == [1, 1]
    batch = corpus.batch(np.array([0, 1]))
    assert batch.src.tolist() == [[8, 9, 10, EOS_ID], [5, 6, EOS_ID, PAD_ID]]
    assert torch.equal(batch.tgt_out, torch.tensor([[14, EOS_ID], [11, EOS_ID]]))
