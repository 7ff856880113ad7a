"""Conversations to token ids: the chat template, image placeholder expansion, label masking.

The template follows LLaVA-1.5::

    <s>USER: <image>...<image>
    Which hemisphere holds the lesion?
    ASSISTANT: left</s>

Each ``<image>`` placeholder becomes exactly as many image tokens as its
image's modality produces (invariant I3). Only assistant answers and their
end-of-sequence token are learned; everything else is ``-100`` in the labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.errors import DataError, TokenCountError
from umbrella_core.types import IMAGE_PLACEHOLDER, Turn

IGNORE_INDEX = -100

USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "ASSISTANT: "


@attrs.frozen
class Encoded:
    input_ids: list[int]
    labels: list[int]


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(
    turns: Sequence[Turn],
    image_modalities: Sequence[str],
    *,
    tokenizer: Any,
    image_token_id: int,
    tokens_per_modality: Mapping[str, int],
    max_length: int,
    add_generation_prompt: bool = False,
    where: str = "",
) -> Encoded:
    """Token ids and labels of one conversation.

    Args:
        turns: The conversation.
        image_modalities: Modality of each image, in placeholder order.
        tokens_per_modality: Image tokens per image of each modality.
        max_length: Longest sequence the model takes; longer is a DataError
            (image tokens are never truncated).
        add_generation_prompt: End with the assistant prefix, for generation
            (drops the last assistant turn if present).
        where: Where the record came from, for error messages.
    """
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    images = iter(image_modalities)
    used = 0
    turns = list(turns)
    if add_generation_prompt and turns and turns[-1].role == "assistant":
        turns = turns[:-1]

    def add(piece_ids: list[int], learn: bool) -> None:
        ids.extend(piece_ids)
        labels.extend(piece_ids if learn else [IGNORE_INDEX] * len(piece_ids))

    for turn in turns:
        if turn.role == "user":
            pieces = turn.content.split(IMAGE_PLACEHOLDER)
            add(_text_ids(tokenizer, USER_PREFIX + pieces[0]), False)
            for piece in pieces[1:]:
                modality = next(images, None)
                if modality is None:
                    raise TokenCountError(
                        f"{where}: more {IMAGE_PLACEHOLDER} placeholders than images"
                    )
                if modality not in tokens_per_modality:
                    raise DataError(
                        f"{where}: image of modality {modality!r} is not active in this run"
                    )
                used += 1
                add([image_token_id] * tokens_per_modality[modality], False)
                add(_text_ids(tokenizer, piece), False)
            add(_text_ids(tokenizer, "\n"), False)
        else:
            add(_text_ids(tokenizer, ASSISTANT_PREFIX), False)
            answer = _text_ids(tokenizer, turn.content)
            if tokenizer.eos_token_id is not None:
                answer.append(tokenizer.eos_token_id)
            add(answer, True)
            add(_text_ids(tokenizer, "\n"), False)
    if add_generation_prompt:
        add(_text_ids(tokenizer, ASSISTANT_PREFIX), False)
    if used != len(image_modalities):
        raise TokenCountError(
            f"{where}: {len(image_modalities)} image(s) but "
            f"{used} {IMAGE_PLACEHOLDER} placeholder(s)"
        )
    if len(ids) > max_length:
        raise DataError(
            f"{where}: the conversation is {len(ids)} tokens long (images included) but the "
            f"model takes at most {max_length}; shorten it or raise model.max_length"
        )
    return Encoded(ids, labels)
