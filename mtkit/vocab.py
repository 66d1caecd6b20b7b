"""The special token ids every vocabulary of mtkit reserves, in one place.

``mtkit tokenizer train`` asks SentencePiece for exactly these ids, and the model, batching
and search rely on them. This module imports neither torch nor sentencepiece, so tensor-only
code (search, batching) does not pull in the tokenizer.
"""

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))
"""Ids that never appear inside a detokenised text (UNK does: it stands for a real piece)."""

MASKED_LOGIT = -1.0e4
"""Output bias of a column a model must never predict (an imported model's duplicated special
token, ``mtkit.huggingface``): its probability is exactly 0 in float32 and bfloat16, while the
loss stays finite. Label smoothing leaves such columns out (``mtkit.loss``)."""
