"""The next-token loss at learned positions only, without full-vocabulary logits.

Only assistant replies are learned (labels other than ``-100``, a few per cent
of the positions). Full float32 logits at every position cost
``B x L x vocab x 4`` bytes before the backward pass: 17 GB for 16 sequences of
1,000 tokens and Gemma 3's 262,144-token vocabulary. Here the language model's
last hidden states are gathered at the learned positions, and the head and
float32 cross-entropy run on chunks of those rows, each chunk under
non-reentrant activation checkpointing: the backward pass recomputes a
chunk's logits instead of keeping them, so the peak is about one chunk of
logits (``rows x vocab``).

Why not a library: liger-kernel's and cut-cross-entropy's fused
linear-cross-entropy are Triton kernels (GPU only), and PyTorch's own
``F.linear_cross_entropy`` (2.13+, newer than the torch this project supports)
neither caps logits nor gives the argmax that evaluation needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.errors import ModelError

__all__ = ["LogitHead", "learned_token_loss", "CHUNK_ELEMENTS", "UNIFORM_CHUNKS"]

#: Float32 logits per chunk (256 MiB): 256 rows of a 262,144-token vocabulary.
CHUNK_ELEMENTS = 2**26

#: Chunks per forward when every rank must call the same modules the same
#: number of times (DeepSpeed ZeRO-3 gathers the head's weight at each call,
#: a collective): the count cannot depend on this rank's learned tokens, so a
#: chunk holds a share of them instead and its size grows with them.
UNIFORM_CHUNKS = 8

# Text-config fields that scale the head's output in transformers' CausalLM
# heads: Cohere multiplies by ``logit_scale``, Granite divides by
# ``logits_scaling``, MuseSpark multiplies by ``output_multiplier`` (before
# capping). ``True`` marks a divisor.
_SCALES: Sequence[tuple[str, bool]] = (
    ("logit_scale", False),
    ("logits_scaling", True),
    ("output_multiplier", False),
)


class LogitHead:
    """The language model's ``lm_head`` followed by what its family does to the logits.

    transformers' Llava head is a bare linear layer; the text model's own
    CausalLM head may scale the logits (:data:`_SCALES`) and cap them
    (Gemma 2's ``final_logit_softcapping``: ``cap * tanh(logits / cap)``).
    Both are applied here, so training sees the logits the language model was
    trained with. Both are increasing functions, so the argmax (greedy
    decoding) is the same as the bare head's.

    Args:
        lm_head: The linear head (hidden → vocabulary).
        text_config: The language model's config.

    Raises:
        ModelError: A scale or cap that is not a positive number.
    """

    def __init__(self, lm_head: nn.Module, text_config: Any) -> None:
        self.lm_head = lm_head
        self.vocab_size = int(text_config.vocab_size)
        self.scale = 1.0
        for name, divides in _SCALES:
            value = getattr(text_config, name, None)
            if value is None:
                continue
            value = float(value)
            if not (math.isfinite(value) and value > 0):
                raise ModelError(
                    f"text_config.{name} is {value}: UMBRELLA applies it to the logits and needs "
                    "a positive number (a negative one would reverse the argmax)"
                )
            self.scale = self.scale / value if divides else self.scale * value
        cap = getattr(text_config, "final_logit_softcapping", None)
        if cap is not None and not (math.isfinite(float(cap)) and float(cap) > 0):
            raise ModelError(f"text_config.final_logit_softcapping is {cap}: expected > 0 or null")
        self.cap = None if cap is None else float(cap)

    def __call__(self, hidden: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
        """Logits of ``hidden`` (``(..., H)`` → ``(..., vocab)``); at least float32 when
        ``upcast``."""
        logits = self.lm_head(hidden)
        if upcast:
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def _chunk_loss(
    head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor, want_correct: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(hidden)
    loss = F.cross_entropy(logits, targets, reduction="none")
    correct = logits.argmax(-1) == targets if want_correct else None
    return loss, correct


def learned_token_loss(
    head: LogitHead,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    uniform: bool = False,
    want_correct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position next-token NLL (and argmax hits) computed at learned positions only.

    Args:
        head: The head that turns hidden states into logits.
        hidden: The language model's last hidden states, ``(B, L, H)``.
        labels: ``(B, L)``, ``-100`` where nothing is learned.
        chunk_size: Rows of logits per chunk; default :data:`CHUNK_ELEMENTS` / vocab.
            Ignored when ``uniform``.
        uniform: Split into exactly :data:`UNIFORM_CHUNKS` chunks (some possibly
            empty) whatever the number of learned tokens, so every rank calls the
            head the same number of times (DeepSpeed ZeRO-3).
        want_correct: Also say whether the argmax equals the label.

    Returns:
        ``token_loss``: ``(B, L - 1)`` float32 (or wider), the NLL of ``labels[:, 1:]``
        given each position, 0.0 where unlearned. ``token_correct``:
        ``(B, L - 1)`` bool, argmax equals the label (False where unlearned),
        or None without ``want_correct``.
    """
    targets = labels[:, 1:].to(hidden.device)
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    n = rows.numel()
    if n:
        picked, wanted = hidden[:, :-1][rows, cols], targets[rows, cols]
    else:
        # No learned token: one stand-in row, multiplied by exactly 0.0 below,
        # keeps the head and the language model in the graph (every trainable
        # parameter used: DDP, I4) with exact-zero gradients and a 0.0 loss.
        picked = hidden[:1, 0]
        wanted = torch.zeros(1, dtype=torch.long, device=hidden.device)
    if uniform:
        chunks = picked.tensor_split(UNIFORM_CHUNKS), wanted.tensor_split(UNIFORM_CHUNKS)
    else:
        size = chunk_size or max(1, CHUNK_ELEMENTS // head.vocab_size)
        chunks = picked.split(size), wanted.split(size)
    losses, hits = [], []
    for h, t in zip(*chunks, strict=True):
        if torch.is_grad_enabled():
            loss, correct = checkpoint(_chunk_loss, head, h, t, want_correct, use_reentrant=False)
        else:
            loss, correct = _chunk_loss(head, h, t, want_correct)
        losses.append(loss)
        hits.append(correct)
    loss = torch.cat(losses)
    shape = targets.shape
    token_loss = torch.zeros(shape, dtype=loss.dtype, device=hidden.device)
    token_correct = torch.zeros(shape, dtype=torch.bool, device=hidden.device)
    if not n:
        return token_loss + loss.sum() * 0.0, token_correct if want_correct else None
    token_loss = token_loss.index_put((rows, cols), loss)
    if want_correct:
        token_correct = token_correct.index_put((rows, cols), torch.cat(hits))
    return token_loss, token_correct if want_correct else None
