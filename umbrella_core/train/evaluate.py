"""Held-out evaluation: does the model's greedy answer equal the reference answer?

With teacher forcing, greedy decoding reproduces the reference answer exactly
when, at every answer position (the end-of-sequence token included), the most
likely next token is the reference token. One forward pass per batch therefore
gives exact-match accuracy of greedy generation, without a decode loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from umbrella_core.data.collate import UmbrellaCollator
from umbrella_core.data.conversation import IGNORE_INDEX

__all__ = ["answer_accuracy"]


@torch.no_grad()
def answer_accuracy(
    model: Any, dataset: Any, collator: UmbrellaCollator, *, batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """Per modality key: ``{"accuracy", "loss", "n"}`` over every item of ``dataset``."""
    was_training = model.training
    model.eval()
    stats: dict[str, list[float]] = {}
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(items)
            batch = {
                k: (
                    v.to(device)
                    if isinstance(v, torch.Tensor)
                    else {m: t.to(device) for m, t in v.items()}
                    if isinstance(v, dict)
                    else v
                )
                for k, v in batch.items()
            }
            out = model(**batch)
            predicted = out.logits[:, :-1].argmax(-1)
            target = batch["labels"][:, 1:]
            learned = target != IGNORE_INDEX
            correct = ((predicted == target) | ~learned).all(dim=1)
            token_loss = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].float().transpose(1, 2),
                target,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            per_row = token_loss.sum(1) / learned.sum(1).clamp(min=1)
            for key, ok, loss in zip(
                batch["sample_keys"], correct.tolist(), per_row.tolist(), strict=False
            ):
                s = stats.setdefault(key, [0.0, 0.0, 0.0])
                s[0] += float(ok)
                s[1] += loss
                s[2] += 1
    finally:
        model.train(was_training)
    return {
        k: {"accuracy": s[0] / s[2], "loss": s[1] / s[2], "n": int(s[2])}
        for k, s in sorted(stats.items())
    }


def format_table(
    results: dict[str, dict[str, float]], chance: Sequence[float] | None = None
) -> str:
    lines = [f"{'modality':<14}{'n':>6}{'accuracy':>10}{'loss':>9}"]
    for key, r in results.items():
        lines.append(f"{key:<14}{r['n']:>6}{r['accuracy']:>10.1%}{r['loss']:>9.4f}")
    return "\n".join(lines)
