"""How long encoding one conversation takes, per language-model family's chat template.

Encoding runs for every sample at every step (in the DataLoader workers), so it
must stay well under a millisecond for a short conversation. Compared with the
hard-coded LLaVA-1.5 encoder it replaced (kept here as the baseline).

    python benchmarks/chat_encode.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

# The tiny language-model families are the repository's test fixtures, not an
# installed package: a script run from benchmarks/ finds them in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models.families import FAMILIES, family_tokenizer  # noqa: E402
from umbrella_core.model.chat import chat_format  # noqa: E402
from umbrella_core.model.chat_templates import prepare_tokenizer  # noqa: E402
from umbrella_core.model.tokenizer import IMAGE_TOKEN, build_byte_tokenizer  # noqa: E402
from umbrella_core.types import IMAGE_PLACEHOLDER, Turn  # noqa: E402

SINGLE = [
    Turn(role="user", content=f"{IMAGE_PLACEHOLDER}\nWhich hemisphere holds the lesion?"),
    Turn(role="assistant", content="left"),
]
TWO_TURNS = [
    *SINGLE,
    Turn(role="user", content="How old is the subject?"),
    Turn(role="assistant", content="63 years"),
]


def _baseline(turns: list[Turn], tokenizer, image_id: int, count: int) -> list[int]:
    # The hard-coded LLaVA-1.5 encoder UMBRELLA had before chat templates.
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    out = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for turn in turns:
        if turn.role == "user":
            pieces = turn.content.split(IMAGE_PLACEHOLDER)
            out += ids("USER: " + pieces[0])
            for piece in pieces[1:]:
                out += [image_id] * count + ids(piece)
            out += ids("\n")
        else:
            out += ids("ASSISTANT: ") + ids(turn.content) + [tokenizer.eos_token_id] + ids("\n")
    return out


def _best_us(run: Callable[[], object], repeat: int = 5, number: int = 300) -> float:
    for _ in range(30):
        run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            run()
        best = min(best, (time.perf_counter() - start) / number * 1e6)
    return best


def _row(name: str) -> tuple[float, float, float]:
    from tokenizers import AddedToken

    tokenizer = build_byte_tokenizer() if name == "byte" else family_tokenizer(name)
    if name != "byte":
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True)], special_tokens=True)
    prepare_tokenizer(tokenizer, "auto")
    chat = chat_format(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    options = dict(
        tokenizer=tokenizer,
        image_token_id=image_id,
        tokens_per_modality={"t1": 216},
        max_length=4096,
    )
    return (
        _best_us(lambda: chat.encode(SINGLE, ["t1"], **options)),
        _best_us(lambda: chat.encode(TWO_TURNS, ["t1"], **options)),
        _best_us(lambda: _baseline(SINGLE, tokenizer, image_id, 216)),
    )


def main() -> None:
    print(f"{'family':10s} {'single':>8s} {'two-turn':>9s} {'baseline':>9s}  (microseconds)")
    for name in ("byte", *FAMILIES):
        single, two, base = _row(name)
        print(f"{name:10s} {single:8.0f} {two:9.0f} {base:9.0f}")


if __name__ == "__main__":
    main()
