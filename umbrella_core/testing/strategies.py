"""hypothesis strategies for UMBRELLA values, for property-based tests of plugins and core.

::

    from hypothesis import given
    from umbrella_core.testing.strategies import modality_specs, study_records

    @given(study_records(modality_specs()))
    def test_my_writer_round_trips(record): ...

Requires hypothesis (``pip install umbrella-core[test]``). Imports no torch.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from umbrella_core.types import IMAGE_PLACEHOLDER, ImageRef, ModalitySpec, StudyRecord, Turn

__all__ = [
    "modality_names",
    "geometries",
    "modality_specs",
    "conversations",
    "study_records",
    "volumes",
    "token_items",
]

_FIRST = string.ascii_lowercase
_REST = string.ascii_lowercase + string.digits


def modality_names() -> st.SearchStrategy[str]:
    """Lower-case names a user can type (``t1``, ``pet2``)."""
    return st.builds(
        lambda a, b: a + b, st.sampled_from(_FIRST), st.text(_REST, min_size=0, max_size=6)
    )


@st.composite
def geometries(
    draw: st.DrawFn, ndim: int | None = None, max_patches: int = 3, max_patch: int = 4
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A valid ``(shape, patch_size)`` pair: each side a whole number of patches."""
    n = draw(st.sampled_from((3, 4))) if ndim is None else ndim
    patch = tuple(draw(st.integers(1, max_patch)) for _ in range(n))
    shape = tuple(p * draw(st.integers(1, max_patches)) for p in patch)
    return shape, patch


def _load_not_used(spec: ModalitySpec, paths: Sequence[str]) -> Any:
    raise NotImplementedError("strategy-made specs do not load files")


@st.composite
def modality_specs(
    draw: st.DrawFn,
    name: str | None = None,
    ndim: int | None = None,
    max_channels: int = 3,
) -> ModalitySpec:
    """A valid ModalitySpec with small geometry (its ``load`` raises: no files behind it)."""
    shape, patch = draw(geometries(ndim=ndim))
    return ModalitySpec(
        name=name if name is not None else draw(modality_names()),
        ndim=len(shape),
        shape=shape,
        patch_size=patch,
        channels=draw(st.integers(1, max_channels)),
        load=_load_not_used,
        description="made by umbrella_core.testing.strategies",
    )


_WORDS = st.text(string.ascii_letters + string.digits + " .,?'-", min_size=1, max_size=40).filter(
    lambda s: s.strip() != ""
)


@st.composite
def conversations(draw: st.DrawFn, images: int = 1, max_turns: int = 2) -> tuple[Turn, ...]:
    """User/assistant turns with exactly ``images`` placeholders, all in user turns."""
    pairs = draw(st.integers(1, max_turns))
    users = [draw(_WORDS) for _ in range(pairs)]
    # Spread the placeholders over the user turns, at the start or the end of each.
    for _ in range(images):
        i = draw(st.integers(0, pairs - 1))
        users[i] = (
            f"{IMAGE_PLACEHOLDER}\n{users[i]}"
            if draw(st.booleans())
            else f"{users[i]} {IMAGE_PLACEHOLDER}"
        )
    turns: list[Turn] = []
    for user in users:
        turns.append(Turn(role="user", content=user))
        turns.append(Turn(role="assistant", content=draw(_WORDS)))
    return tuple(turns)


@st.composite
def study_records(
    draw: st.DrawFn,
    specs: st.SearchStrategy[ModalitySpec] | Sequence[ModalitySpec] | None = None,
    max_images: int = 3,
    folder: str = "/data",
) -> StudyRecord:
    """A StudyRecord whose images are of the given modalities (paths need not exist)."""
    if specs is None:
        specs = modality_specs()
    pool = st.sampled_from(list(specs)) if isinstance(specs, Sequence) else specs
    chosen = draw(st.lists(pool, min_size=1, max_size=max_images))
    subject = "sub-" + draw(st.text(_REST, min_size=1, max_size=6))
    images = [
        ImageRef(
            modality=spec.name,
            paths=[f"{folder}/{subject}_{spec.name}_c{c}.nii.gz" for c in range(spec.channels)],
        )
        for spec in chosen
    ]
    return StudyRecord(
        subject=subject,
        images=images,
        turns=draw(conversations(images=len(images))),
        study=draw(st.sampled_from(("study-a", "study-b"))),
        split=draw(st.sampled_from(("train", "validation", "test"))),
        source=f"{folder}/manifest.jsonl:{draw(st.integers(1, 999))}",
    )


@st.composite
def volumes(draw: st.DrawFn, spec: ModalitySpec, finite: bool = True) -> Any:
    """A float32 array of shape ``(channels, *spec.shape)`` (a model-ready image)."""
    import numpy as np
    from hypothesis.extra.numpy import arrays

    elements = st.floats(-1e3, 1e3, width=32) if finite else st.floats(width=32)
    return draw(arrays(np.float32, spec.input_shape, elements=elements))


@st.composite
def token_items(
    draw: st.DrawFn,
    modalities: Sequence[str],
    *,
    max_images: int = 3,
    max_prompt: int = 6,
    max_answer: int = 6,
    vocab: int = 50,
) -> dict[str, Any]:
    """One dataset item as the collator takes it, plus ``prompt``: its prompt length.

    ``input_ids`` is a prompt (labels -100) followed by an answer (labels =
    ids); ``images`` is a list of ``(modality, tag)`` where ``tag`` is an int
    the test can turn into a tensor.
    """
    n_images = draw(st.integers(0, max_images))
    images = [draw(st.sampled_from(list(modalities))) for _ in range(n_images)]
    prompt = draw(st.lists(st.integers(1, vocab), min_size=1, max_size=max_prompt))
    answer = draw(st.lists(st.integers(1, vocab), min_size=1, max_size=max_answer))
    return {
        "input_ids": prompt + answer,
        "labels": [-100] * len(prompt) + answer,
        "images": images,
        "prompt": len(prompt),
        "key": draw(st.text(_REST, min_size=1, max_size=8)),
    }
