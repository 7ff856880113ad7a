"""``umbrella train --language DIR`` on the built-in demo, end to end, as a user runs it.

A tiny Gemma-3-family language model (random weights, the family's tokenizer
conventions and chat template; a Llama-3-family one too on request) is saved
with ``save_pretrained``; the run composes a LLaVA-style model from it, trains it
on the demo (a random language model learns nothing frozen, so everything
trains), answers the held-out questions well above chance, and ``umbrella
generate`` answers through the family's chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models.families import save_tiny_language_model

pytestmark = pytest.mark.slow

# Gemma 3: the family that differs most from the built-in model (scaled input
# embeddings, tied head, its own turn markers). Every family composes, trains
# and reloads in test_compose.py; the Llama 3 run of this test is recorded in
# benchmarks/README.md (UMBRELLA_LANGUAGE_DEMO=llama,gemma3 runs both: ~2 min each).
FAMILIES = tuple(os.environ.get("UMBRELLA_LANGUAGE_DEMO", "gemma3").split(","))


@pytest.fixture(scope="module", params=FAMILIES)
def language_run(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    # A small vocabulary keeps the run short; the real sizes are tested in test_compose.py.
    folder = save_tiny_language_model(
        family, root / "lm", vocab_size=2048, hidden_size=64, intermediate_size=128
    )
    env = dict(os.environ)
    env.setdefault("UMBRELLA_CACHE", str(root / "cache"))
    command = [
        sys.executable,
        "-m",
        "umbrella_core.commands",
        "train",
        "--language",
        str(folder),
        "--modalities",
        "t1,dmri",
        "--trainable",
        "full",
        # Its language model is random: the rate of a random start, not of a pretrained one.
        "--lr",
        "1e-3",
        "--output-dir",
        str(root / "run"),
        "--no-progress",
        # Learning is what this checks (best/ and evaluation have tests of their own):
        # only the table of the test records, after the last step.
        "--set",
        "trainer.eval_strategy=end",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return family, folder, root / "run", result.stdout, env


def test_a_composed_model_learns_the_demo(language_run):
    family, folder, run, stdout, _ = language_run
    assert f"language     {folder}" in stdout
    metrics = json.loads((run / "metrics.json").read_text())
    held_out = metrics["held_out"]
    assert set(held_out) == {"t1", "dmri"}
    for modality, result in held_out.items():
        # Chance is 50 %: well above it, with margin for other CPUs.
        assert result["accuracy"] >= 0.75, (family, modality, result, stdout)


def test_generate_answers_through_the_family_chat_template(language_run):
    from umbrella_core.inference.generate import load_for_inference
    from umbrella_core.model.chat import chat_format
    from umbrella_core.plugins import get_plugin_manager
    from umbrella_core.types import Turn

    family, _, run, _, env = language_run
    manifest = next(Path(env["UMBRELLA_CACHE"]).glob("demo-dmri-t1-*/manifest.jsonl"))
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    record = next(r for r in records if r["split"] == "test" and r["images"][0]["modality"] == "t1")
    image = manifest.parent / record["images"][0]["path"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "umbrella_core.commands",
            "generate",
            "--checkpoint",
            str(run / "final"),
            "--image",
            str(image),
            "--prompt",
            "Which hemisphere holds the lesion?",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].strip() in {"left", "right"}

    # The prompt it answered is the family's own template with its generation prompt.
    loaded = load_for_inference(run / "final", get_plugin_manager(), device="cpu")
    tokenizer = loaded.tokenizer
    chat = chat_format(tokenizer, "auto")
    encoded = chat.encode(
        [Turn(role="user", content="<image>\nWhich hemisphere holds the lesion?")],
        ["t1"],
        tokenizer=tokenizer,
        image_token_id=loaded.model.image_token_id,
        tokens_per_modality={"t1": 1},
        max_length=4096,
        add_generation_prompt=True,
    )
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhich hemisphere holds the lesion?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(encoded.input_ids) == expected
    marker = {"llama": "<|start_header_id|>assistant", "gemma3": "<start_of_turn>model"}[family]
    assert marker in expected[-len(marker) - 20 :]
