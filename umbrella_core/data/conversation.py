"""Conversations to token ids: the chat template, image placeholder expansion, label masking.

The language model's own conversation format does the work
(:mod:`umbrella_core.model.chat`); this module keeps the function the data
pipeline calls. Without a format it uses the tokenizer's own chat template,
else LLaVA-1.5's::

    <s>USER: <image>...<image>
    Which hemisphere holds the lesion?
    ASSISTANT: left</s>

Each ``<image>`` placeholder becomes exactly as many image tokens as its
image's modality produces (invariant I3). Only assistant answers and their
end-of-turn token are learned; everything else is ``-100`` in the labels (I9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from umbrella_core.model.chat import Encoded, chat_format
from umbrella_core.types import ModalitySpec, StudyRecord, Turn

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.model.chat import ChatFormat

__all__ = ["Tokenization", "encode_conversation", "default_chat_format"]

# One compiled format per tokenizer for callers that pass none: compiling
# renders a probe conversation, too slow to repeat per sample.
_DEFAULT_FORMATS: dict[int, tuple[Any, tuple[int, Any], ChatFormat]] = {}


def default_chat_format(tokenizer: Any) -> ChatFormat:
    """The format ``auto`` gives ``tokenizer`` (its own chat template, else LLaVA-1.5), cached."""
    # Stale once tokens or the template change (prepare_tokenizer does both).
    state = (len(tokenizer), getattr(tokenizer, "chat_template", None))
    cached = _DEFAULT_FORMATS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer and cached[1] == state:
        return cached[2]
    chat = chat_format(tokenizer, "auto")
    if len(_DEFAULT_FORMATS) > 16:
        _DEFAULT_FORMATS.clear()
    _DEFAULT_FORMATS[id(tokenizer)] = (tokenizer, state, chat)
    return chat


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
    chat: ChatFormat | None = None,
) -> Encoded:
    """Token ids and labels of one conversation.

    Args:
        turns: The conversation.
        image_modalities: Modality of each image, in placeholder order.
        tokens_per_modality: Image tokens per image of each modality.
        max_length: Longest sequence the model takes; longer is a DataError
            (image tokens are never truncated).
        add_generation_prompt: End with the generation prompt (the assistant
            prefix), for generation (drops the last assistant turn if present).
        where: Where the record came from, for error messages.
        chat: The conversation format (:func:`umbrella_core.model.chat.chat_format`);
            None: :func:`default_chat_format` of ``tokenizer``.
    """
    chat = chat if chat is not None else default_chat_format(tokenizer)
    return chat.encode(
        turns,
        image_modalities,
        tokenizer=tokenizer,
        image_token_id=image_token_id,
        tokens_per_modality=tokens_per_modality,
        max_length=max_length,
        add_generation_prompt=add_generation_prompt,
        where=where,
    )


@attrs.frozen(kw_only=True, eq=False)
class Tokenization:
    """How a record becomes tokens: one value for everything that encodes a conversation.

    The tokenizer, its conversation format, the image token and how many of them
    an image of each modality takes (I3), and the longest sequence the model
    takes. A run builds it once from its tokenizer alone (:meth:`for_run`),
    before the model: screening encodes every record with it, and the datasets,
    the length counts of ``data.batching: length``, generation during training
    and evaluation use the same value.

    Attributes:
        tokenizer: The run's tokenizer, readied for its chat template.
        image_token_id: The id each image token has.
        tokens_per_modality: Image tokens per image of each modality.
        max_length: Longest sequence; a longer conversation is a DataError
            (image tokens are never truncated).
        chat: The conversation format (:func:`umbrella_core.model.chat.chat_format`).
    """

    tokenizer: Any = attrs.field(repr=False)
    image_token_id: int
    tokens_per_modality: Mapping[str, int]
    max_length: int
    chat: ChatFormat = attrs.field(repr=False)

    @classmethod
    def of(
        cls,
        tokenizer: Any,
        image_token_id: int,
        specs: Mapping[str, ModalitySpec],
        max_length: int,
        chat: ChatFormat | None = None,
    ) -> Tokenization:
        """From its parts; ``chat`` None: the tokenizer's ``auto`` format (its own template)."""
        return cls(
            tokenizer=tokenizer,
            image_token_id=int(image_token_id),
            tokens_per_modality={name: spec.num_tokens for name, spec in specs.items()},
            max_length=int(max_length),
            chat=chat if chat is not None else default_chat_format(tokenizer),
        )

    @classmethod
    def for_run(cls, model: Any, specs: Mapping[str, ModalitySpec]) -> Tokenization:
        """A run's, from its ``model`` settings and tokenizer alone (no weights are loaded)."""
        from umbrella_core.model.start import load_tokenizer

        tokenizer, image_token_id = load_tokenizer(model)
        chat = chat_format(tokenizer, model.chat_template, model.system_prompt)
        return cls.of(tokenizer, image_token_id, specs, model.max_length, chat)

    def encode(self, record: StudyRecord, *, add_generation_prompt: bool = False) -> Encoded:
        """``record``'s token ids and labels; errors name the record's source."""
        return self.encode_turns(
            record.turns,
            record.modalities,
            add_generation_prompt=add_generation_prompt,
            where=record.source or f"subject {record.subject}",
        )

    def encode_turns(
        self,
        turns: Sequence[Turn],
        image_modalities: Sequence[str],
        *,
        add_generation_prompt: bool = False,
        where: str = "",
    ) -> Encoded:
        """A conversation's token ids and labels (:func:`encode_conversation`'s arguments)."""
        return self.chat.encode(
            list(turns),
            list(image_modalities),
            tokenizer=self.tokenizer,
            image_token_id=self.image_token_id,
            tokens_per_modality=self.tokens_per_modality,
            max_length=self.max_length,
            add_generation_prompt=add_generation_prompt,
            where=where,
        )
