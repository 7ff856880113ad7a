"""Training throughput and peak memory of a composed model of real size, per modality.

A LLaVA-style model composed from a language model of a real shape (random
weights: the shape decides speed and memory, not the values), the first-party
modalities at their default geometry (t1 128³ in 16³ patches = 512 tokens,
fmri 64x64x48 x 24 frames = 288 tokens, dmri 96³ FA+MD = 216 tokens), a fresh
vision body, and two recipes: ``projector`` (embedders + projector, stage 1)
and ``lora`` (adapters on the language model too). Each (size, modality,
recipe) runs AdamW steps on one-modality batches of synthetic images and a
conversation of ~70 text tokens with a short learned answer, as training
does; the table gives the median samples per second over the timed steps and
the peak accelerator memory.

On a GPU (bf16 autocast):

    python benchmarks/gpu.py --sizes 0.5b,1.5b --batch-size 8 --out benchmarks/results/gpu.md

On a CPU, at a small size (the same code path, a smoke run; not in the test suite):

    python benchmarks/gpu.py --sizes tiny --batch-size 2 --steps 3 --warmup 1 \\
        --geometry small
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# The tiny language-model families are the repository's test fixtures, not an
# installed package: a script run from benchmarks/ finds them in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

#: Language model shapes (Qwen2.5 layout: GQA, tied embeddings, 151,936-token vocabulary).
SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "layers": 24,
        "heads": 14,
        "kv_heads": 2,
    },
    "1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "layers": 28,
        "heads": 12,
        "kv_heads": 2,
    },
}

#: ``--geometry small``: the demo's shapes, for a quick CPU run.
SMALL = {"t1": ((32, 32, 32), (8, 8, 8)), "dmri": ((32, 32, 32), (8, 8, 8))}


def build(size: str, modalities: list[str], geometry: str, recipe: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from tiny_models.families import family_config, family_tokenizer
    from umbrella_core.model.build import build_model
    from umbrella_core.model.compose import compose_model
    from umbrella_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    specs = {}
    for name in modalities:
        spec = pm.resolve_modality(name).item
        if geometry == "small" and name in SMALL:
            spec = spec.with_geometry(*SMALL[name])
        specs[spec.name] = spec
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(family_config("qwen2", **SIZES[size]))
    width = 64 if size == "tiny" else 768
    llava, tokenizer = compose_model(
        lm, family_tokenizer("qwen2"), vision="fresh", vision_hidden_size=width, vision_layers=2
    )
    model = build_model(llava, dict(sorted(specs.items())), pm.patch_embedder)
    if recipe == "lora":
        model.add_lora()
    model.set_trainable(recipe)
    return model.to(device), tokenizer


def batch(model, tokenizer, spec, batch_size: int, device: str):
    import torch

    prompt = tokenizer(
        "You are a neuroradiology assistant. Look at the scan and answer briefly. "
        "Which hemisphere holds the lesion, and what is the estimated age of the subject? " * 2,
        add_special_tokens=False,
    )["input_ids"][:64]
    answer = tokenizer(" left, 63 years", add_special_tokens=False)["input_ids"]
    ids = [model.image_token_id] * spec.num_tokens + prompt + answer + [tokenizer.eos_token_id]
    input_ids = torch.tensor([ids] * batch_size, device=device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -len(answer) - 1 :] = input_ids[:, -len(answer) - 1 :]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": {spec.name: torch.randn((batch_size, *spec.input_shape), device=device)},
        "image_modalities": [spec.name] * batch_size,
    }


def run(args: argparse.Namespace, size: str, recipe: str, modality: str) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = build(size, [modality], args.geometry, recipe, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = batch(model, tokenizer, model.specs[modality], args.batch_size, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "size": size,
        "modality": modality,
        "recipe": recipe,
        "tokens": model.specs[modality].num_tokens,
        "sequence": int(inputs["input_ids"].shape[1]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "samples_per_s": args.batch_size / median,
        "step_ms": median * 1000,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "loss": float(loss.detach()),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| size | modality | tokens/image | recipe | trainable | samples/s | step ms | peak GiB |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['size']} ({r['parameters'] / 1e6:,.0f} M) | {r['modality']} | {r['tokens']} "
            f"| {r['recipe']} | {r['trainable'] / 1e6:,.2f} M | {r['samples_per_s']:.1f} "
            f"| {r['step_ms']:.0f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5b,1.5b", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--modalities", default="t1,fmri,dmri")
    parser.add_argument("--recipes", default="projector,lora")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--geometry", choices=["default", "small"], default="default")
    parser.add_argument(
        "--no-bf16", dest="bf16", action="store_false", help="float32 (default: bf16 autocast)"
    )
    parser.add_argument("--out", help="also write the table (Markdown) and rows (JSON) here")
    args = parser.parse_args(argv)
    modalities = [m for m in args.modalities.split(",") if m]
    if args.geometry == "small":
        modalities = [m for m in modalities if m in SMALL]
    rows = []
    for size in args.sizes.split(","):
        for recipe in args.recipes.split(","):
            for modality in modalities:
                rows.append(run(args, size, recipe, modality))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
