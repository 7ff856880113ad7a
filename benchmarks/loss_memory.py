"""Memory and time of the next-token loss at a 262,144-token vocabulary: full logits vs learned.

Two ways to compute the same loss on the same model and batch:

* ``old``: Llava's logits at every position (``B x L x vocab``), upcast to
  float32, cross-entropy with ``ignore_index`` (UMBRELLA before 0.2);
* ``new``: :meth:`UmbrellaModel.forward`, logits only at the learned positions,
  in chunks recomputed by the backward pass (:mod:`umbrella_core.model.loss`).

The model is the built-in tiny Llava layout (1 layer, hidden 32) with Gemma 3's
vocabulary size, so the head and the loss are nearly all of the step: the
figures are the loss's own cost. Each variant runs in a fresh process: the
model and batch are built, the kernel's peak-RSS mark (VmHWM) is reset, then
``--repeats`` forward+backward steps run (after one warm-up); the peak growth
is VmHWM minus the RSS before the steps. Each process writes its loss and
gradients; the parent compares them.

    python benchmarks/loss_memory.py --batch 2 --length 1000 --learned 50 \
        --out benchmarks/results/loss_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script: its folder is on sys.path, and the training-step benchmark
# already has the /proc helpers.
from training_step import reset_peak, status_kib

VOCAB = 262_144


def build(batch: int, length: int, learned: int, vocab: int):
    import torch
    from transformers import LlavaForConditionalGeneration

    from umbrella_core.constants import IGNORE_INDEX
    from umbrella_core.model.build import build_model, tiny_llava_config
    from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality

    pm = fresh_plugin_manager(ToyModalityPlugin(toy_modality("t1", channels=1)))
    specs = {"t1": pm.resolve_modality("t1").item}
    config = tiny_llava_config(
        vocab, vocab - 1, 0, hidden_size=32, vision_hidden_size=32, layers=1, heads=2
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration._from_config(config)
    model = build_model(llava, specs, pm.patch_embedder)
    model.set_trainable("full")
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab - 1, (batch, length), generator=g)
    n = specs["t1"].num_tokens
    ids[:, 1 : 1 + n] = model.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -learned:] = ids[:, -learned:]  # the answer at the end of each sequence
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": {"t1": torch.randn(batch, *specs["t1"].input_shape, generator=g)},
        "image_modalities": ["t1"] * batch,
    }
    return model, inputs


def old_loss(model, inputs):
    """The loss as UmbrellaModel.forward computed it before: full logits at every position."""
    import torch.nn.functional as F

    from umbrella_core.constants import IGNORE_INDEX

    features, coverage = model.image_features(inputs["pixel_values"])
    embeds = model.splice(inputs["input_ids"], features, inputs["image_modalities"])
    logits = model.llava(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=False
    ).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = inputs["labels"][:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    n = (shift_labels != IGNORE_INDEX).sum()
    return token_loss.sum() / n.clamp(min=1) + coverage


def one_variant(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    model, inputs = build(args.batch, args.length, args.learned, args.vocab)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = old_loss(model, inputs) if args.variant == "old" else model(**inputs).loss
        loss.backward()
        return loss.detach()

    step()  # warm-up: first-call allocations and lazy inits
    model.zero_grad(set_to_none=True)
    rss_before = status_kib("VmRSS")
    reset = reset_peak()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    peak = status_kib("VmHWM")
    tensors = {"loss": loss.reshape(1)}
    tensors.update({f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.save)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "median_s": statistics.median(times),
                "times_s": times,
                "rss_before_mib": rss_before / 1024,
                "peak_growth_mib": (peak - rss_before) / 1024 if reset else None,
                "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "loss": float(loss),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--learned", type=int, default=50, help="learned tokens per sequence")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variant", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        one_variant(args)
        return

    from safetensors.torch import load_file

    results, saved = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("new", "old"):
            path = os.path.join(tmp, f"{variant}.safetensors")
            cmd = [sys.executable, __file__, "--variant", variant, "--save", path]
            for flag in ("batch", "length", "learned", "vocab", "repeats", "threads"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            saved[variant] = load_file(path)
            print(json.dumps(results[variant]), flush=True)
    new, old = saved["new"], saved["old"]
    assert sorted(new) == sorted(old), "the two variants train different parameters"
    loss_diff = float((new["loss"] - old["loss"]).abs().max())
    grad_diff = max(float((new[k] - old[k]).abs().max()) for k in new if k != "loss")
    grad_rel = max(
        float((new[k] - old[k]).abs().max() / old[k].abs().max().clamp(min=1e-30))
        for k in new
        if k != "loss" and float(old[k].abs().max()) > 1e-6
    )
    o, n = results["old"], results["new"]
    lines = [
        f"# Loss memory: {args.batch} x {args.length} tokens, {args.learned} learned per "
        f"sequence ({100 * args.learned / args.length:.0f} %), vocabulary {args.vocab:,}",
        "",
        f"{args.threads} torch thread(s), {args.repeats} timed steps after one warm-up; "
        f"`{' '.join(['python', 'benchmarks/loss_memory.py', *sys.argv[1:]])}`",
        "",
        "| loss | median step s (forward+backward) | peak growth over the model MiB "
        "| process peak MiB |",
        "|---|---:|---:|---:|",
        f"| old: full logits | {o['median_s']:.3f} | {o['peak_growth_mib']:.0f} "
        f"| {o['process_peak_mib']:.0f} |",
        f"| new: learned positions, chunked | {n['median_s']:.3f} | {n['peak_growth_mib']:.0f} "
        f"| {n['process_peak_mib']:.0f} |",
        f"| new / old | {n['median_s'] / o['median_s']:.3f}x "
        f"| {n['peak_growth_mib'] / o['peak_growth_mib']:.3f}x | |",
        "",
        f"Max abs difference: loss {loss_diff:.2e}; gradients {grad_diff:.2e} "
        f"(largest relative to that gradient's max: {grad_rel:.1e}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
