"""Each conversation's length in tokens, without loading an image (since 0.3).

``data.batching: length`` groups samples of similar length; it needs every
training sample's length before the first step. A length is what the
collator pads: the template's text tokens plus each image's token count
(I3), so images are never opened. Two things keep this cheap at 100,000
records:

* A cohort's records share few conversations (one question per task, answers
  from a short list), so each distinct ``(turns, modalities)`` is counted once.
* A conversation is rendered once and its text tokenized in batches (the Rust
  tokenizer's ``encode_batch``, threaded), without the learned-span search of
  a full :meth:`~umbrella_core.model.chat.ChatFormat.encode` (two more
  renderings per reply).

The count is the encoding's length wherever the template's generation
prompt ends between two tokens: with the byte-level ``tiny`` tokenizer and
with each model family's own template (none of 600 varied conversations
differed, for each of the five families of the repository's test fixtures,
``tests/tiny_models/families.py``). Where a token of the rendered text
straddles the start or end of a reply (``llava-1.5``'s ``ASSISTANT:`` and a
BPE token holding the space before the reply), the full encoding splits it so that
generation prompts stay prefixes, and the count is a few tokens short (up to
three per reply in those tests). For grouping samples by length that does
not matter; a caller that has the encodings (screening encodes every
conversation) can hand their exact lengths over instead
(``RecordDataset(record_lengths=)``). Counting is about 3.5x faster than
encoding (``benchmarks/padding.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from umbrella_core.types import IMAGE_PLACEHOLDER, StudyRecord

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.data.conversation import Tokenization

__all__ = ["conversation_lengths"]

# Texts per tokenizer call: bounds the memory of the encodings held at once.
_CHUNK = 4096


def conversation_lengths(records: Sequence[StudyRecord], tokenization: Tokenization) -> np.ndarray:
    """Token count of each record's conversation, images included (int64, one per record).

    Args:
        records: The records, in the order the counts are wanted.
        tokenization: How the run encodes a record (its tokenizer, chat format and
            image tokens per modality).
    """
    chat, tokenizer = tokenization.chat, tokenization.tokenizer
    tokens_per_modality = tokenization.tokens_per_modality
    slot: dict[tuple[Any, ...], int] = {}
    of_record = np.empty(len(records), dtype=np.int64)
    texts: list[str] = []
    owner: list[int] = []
    images: list[int] = []
    for position, record in enumerate(records):
        same = (tuple(record.turns), tuple(record.modalities))
        index = slot.get(same)
        if index is None:
            index = slot[same] = len(images)
            text = chat.render(chat.messages(record.turns))
            pieces = [p for p in text.split(IMAGE_PLACEHOLDER) if p]
            texts.extend(pieces)
            owner.extend([index] * len(pieces))
            images.append(sum(tokens_per_modality.get(m, 0) for m in record.modalities))
        of_record[position] = index
    counts = np.asarray(images, dtype=np.int64)
    text_tokens = _token_counts(tokenizer, texts)
    np.add.at(counts, np.asarray(owner, dtype=np.int64), text_tokens)
    return counts[of_record]


def _token_counts(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Tokens of each text as the chat format tokenizes it (no special tokens added)."""
    out = np.zeros(len(texts), dtype=np.int64)
    rust = getattr(tokenizer, "backend_tokenizer", None)
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        if rust is not None:
            sizes = [len(e) for e in rust.encode_batch(chunk, add_special_tokens=False)]
        else:
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            sizes = [len(i) for i in ids]
        out[start : start + len(chunk)] = sizes
    return out
