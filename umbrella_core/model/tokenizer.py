"""The built-in tokenizer: byte-level, built in code, nothing downloaded.

256 byte symbols plus the special tokens below cover any text in any language,
so the tiny default model needs no trained vocabulary. It is saved next to
every checkpoint like any Hugging Face tokenizer.
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)


def build_byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over bytes with ``<image>`` as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def ensure_image_token(tokenizer: Any, image_token_id: int | None = None) -> int:
    """The id of ``<image>`` in ``tokenizer``, checked against the model's ``image_token_id``."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        from umbrella_core.errors import ModelError

        raise ModelError(
            f"the tokenizer has no {IMAGE_TOKEN} token; "
            "a LLaVA checkpoint's tokenizer must define it"
        )
    if image_token_id is not None and token_id != image_token_id:
        from umbrella_core.errors import ModelError

        raise ModelError(
            f"the tokenizer maps {IMAGE_TOKEN} to id {token_id} but the model expects "
            f"image_token_id {image_token_id}"
        )
    return int(token_id)


def add_image_token(tokenizer: Any) -> int:
    """The id of ``<image>`` in ``tokenizer``, added as a special token where it is missing.

    A language model's own tokenizer lacks it; a LLaVA checkpoint's has it.
    """
    from transformers import AddedToken

    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        tokenizer.add_tokens(
            [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
        )
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return int(token_id)
