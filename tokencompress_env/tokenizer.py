"""Tokenizers: a byte-level BPE trained offline with ``tokenizers``, or a hub/local GPT-2 tokenizer.

Either way the tokenizer carries a mask token (``<|mask|>``) that stands for a dropped token in the
reconstructor's input, and uses ``<|endoftext|>`` as beginning-of-window, end and padding token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: Token that marks a dropped position in the reconstructor's input.
MASK_TOKEN = "<|mask|>"
#: Beginning/end of text (GPT-2's own), also used for padding.
EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on ``texts``.

    :param texts: the training texts
    :param vocab_size: target vocabulary size, special tokens included
    :param min_frequency: minimum pair frequency for a merge
    :return: a fast tokenizer with ``<|endoftext|>`` and ``<|mask|>``
    """
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN, MASK_TOKEN], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=1_000_000,
    )


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the mask and padding tokens to a GPT-2 tokenizer that lacks them.

    :param tokenizer: the tokenizer, modified in place
    :return: the number of tokens added (the model's embeddings must grow by as many)
    """
    added = 0
    if tokenizer.mask_token is None:
        added += tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added
