"""How fast the new image path of a composed model learns through a frozen language model.

The diagnostic behind ``trainer.learning_rate``'s choice for pretrained
language models (``umbrella_core.config.PRETRAINED_LEARNING_RATE``): the demo's
hemisphere questions of one modality, a model composed from ``--lm`` as
``umbrella train --language`` composes it, only the image path trainable
(embedders, fresh vision body, projector: stage 1 of the default recipe), AdamW
with gradient clipping at 1.0 and a constant learning rate per ``--lrs`` entry,
batches drawn at random. Each step first scores its batch (before the update,
so on answers it has not been trained on in this step): the loss and the share
right of the answer's first token; printed as means over 5 steps, and the mean
of the last 15 steps.

    python benchmarks/image_path_lr.py --lm "$(python benchmarks/real_lms.py \
        --models gemma3-270m --paths)" --modality dmri --lrs 1e-3,3e-3,3e-4
"""

from __future__ import annotations

import argparse
import time

import torch


def run(lm: str, modality: str, lr: float, steps: int, batch_size: int, seed: int) -> float:
    from umbrella_core.config import load_config
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.train.run import prepare

    torch.manual_seed(seed)
    settings = [f"data.modalities={modality}", "data.demo_subjects=120"]
    settings += ["model.trainable=projector", f"model.language={lm}", "trainer.progress=false"]
    prep = prepare(load_config(None, settings), get_plugin_manager(), log=lambda _: None)
    model = prep.model
    collate = UmbrellaCollator(prep.tokenizer.pad_token_id, tuple(prep.specs))
    items = [prep.train_sets[0][i] for i in range(len(prep.train_sets[0]))]
    # The hemisphere question's answers are one word and the end of the turn.
    hemisphere = [it for it in items if sum(1 for t in it["labels"] if t != -100) == 2]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    draws = torch.Generator().manual_seed(seed)
    model.train()
    right: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(len(hemisphere), (batch_size,), generator=draws).tolist()
        batch = collate([hemisphere[i] for i in rows])
        out = model(**batch, return_correct=True)
        learned = batch["labels"][:, 1:] != -100
        first = learned & (learned.float().cumsum(1) == 1)
        right.append(float((out.token_correct.float() * first).sum() / first.sum()))
        loss = float((out.token_loss.detach() * first).sum() / first.sum())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 5 == 0:
            print(
                f"  lr {lr:g} step {step + 1}: first answer token loss {loss:.3f}, "
                f"right {sum(right[-5:]) / 5:.2f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return sum(right[-15:]) / len(right[-15:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", required=True, help="a causal LM folder (real_lms.py)")
    parser.add_argument("--modality", default="dmri")
    parser.add_argument("--lrs", default="1e-3,3e-4")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    for lr in (float(x) for x in args.lrs.split(",")):
        results[lr] = run(args.lm, args.modality, lr, args.steps, args.batch_size, args.seed)
    for lr, share in results.items():
        print(f"lr {lr:g}: share right over the last 15 steps {share:.2f}")


if __name__ == "__main__":
    main()
