"""One checkpoint answering questions about scans: what the web page and the API share.

An :class:`Assistant` holds the loaded checkpoint and a lock (one model, one
answer at a time). Images are read exactly as ``umbrella generate`` reads them
(:func:`~umbrella_core.inference.generate.read_images`: the checks training applies,
then the run's preprocessing), conversations are rendered through the
checkpoint's own chat template, and decoding is greedy, so the same question
about the same file gets the same answer from the CLI, the page and the API.

(Since 0.3.)
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from umbrella_core.errors import ConfigError, DataError
from umbrella_core.types import IMAGE_PLACEHOLDER, ModalitySpec, Turn

__all__ = ["Assistant", "Reply", "Image", "Answer", "group_files", "NIFTI_SUFFIXES"]

#: What counts as an image file among uploads; anything else (``.bval``,
#: ``.bvec``, ``.json`` sidecars) is kept beside them for the loaders to find.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@attrs.frozen
class Image:
    """One image as the model reads it.

    Attributes:
        modality: The checkpoint's modality name.
        files: The file(s) of the image (one, or one per channel).
        tensor: The preprocessed ``(channels, *shape)`` float32 tensor the model gets.
    """

    modality: str
    files: tuple[str, ...]
    tensor: Any = attrs.field(eq=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.modality}: {' + '.join(os.path.basename(f) for f in self.files)}"


@attrs.frozen
class Answer:
    """A generated reply and its token counts (for the API's ``usage``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    #: ``stop`` (the model ended its turn) or ``length`` (``max_new_tokens`` reached).
    finish_reason: str


def _match(name: str, specs: Mapping[str, ModalitySpec]) -> tuple[str, int, str] | None:
    """``(modality, pattern rank, stem)`` of the first ``file_patterns`` entry ``name`` fits.

    The stem is what the pattern's leading ``*`` matched (``sub-01`` of
    ``sub-01_FA.nii.gz`` for ``*_FA.nii.gz``): the files of one image share it.
    """
    for modality, spec in specs.items():
        for rank, pattern in enumerate(spec.file_patterns):
            if fnmatch.fnmatchcase(name, pattern):
                simple = pattern.startswith("*") and "*" not in pattern[1:]
                stem = name[: len(name) - (len(pattern) - 1)] if simple else name
                return modality, rank, stem
    return None


def group_files(
    paths: Sequence[str],
    specs: Mapping[str, ModalitySpec],
    *,
    modality: str | None = None,
) -> list[tuple[str | None, list[str]]]:
    """Uploaded files as images: ``(modality or None, files)`` in upload order.

    Files of one modality with several channels whose names differ only in
    the pattern they match (``sub-01_FA.nii.gz`` and ``sub-01_MD.nii.gz``) are
    one image, ordered as the modality's ``file_patterns`` list them (the
    channel order its loader expects). ``modality`` (the user's choice)
    applies to every file; otherwise a file no pattern matches has modality
    None: the caller asks the user. Non-NIfTI files (``.bval``, ``.bvec``,
    ``.json``) are not images; they stay beside the images for the loaders.
    """
    groups: dict[str, tuple[str | None, list[tuple[int, str]]]] = {}
    for path in paths:
        name = os.path.basename(path)
        if not name.lower().endswith(NIFTI_SUFFIXES):
            continue
        candidates = (
            {modality: specs[modality]} if modality is not None and modality in specs else specs
        )
        found = _match(name, candidates)
        chosen = modality if modality is not None else (found[0] if found else None)
        key, rank = path, 0
        if found and chosen is not None and chosen in specs and specs[chosen].channels > 1:
            key, rank = os.path.join(os.path.dirname(path), found[2]), found[1]
        groups.setdefault(key, (chosen, []))[1].append((rank, path))
    return [(m, [p for _, p in sorted(files)]) for m, files in groups.values()]


class Assistant:
    """A checkpoint ready to answer, shared by the page and the API (thread-safe)."""

    def __init__(
        self,
        loaded: Any,
        installed: Mapping[str, ModalitySpec] | None = None,
        *,
        name: str = "umbrella",
    ) -> None:
        self.loaded = loaded
        #: Every installed modality: a file of one the checkpoint lacks is named as such.
        self.installed = dict(installed or {})
        #: The model's name in the API (``umbrella/final``: run folder and checkpoint).
        self.name = name
        self.lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, pm: Any) -> Assistant:
        from umbrella_core.inference.generate import load_for_inference

        loaded = load_for_inference(checkpoint, pm)
        installed = {name: p.item for name, p in pm.modality_registry().items()}
        folder = Path(checkpoint).expanduser().resolve()
        return cls(loaded, installed, name=f"{folder.parent.name}/{folder.name}")

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        return self.loaded.specs

    def questions(self) -> dict[str, str]:
        """Each modality's demo question (what the demo trained the model to answer)."""
        return {
            name: spec.demo.question
            for name, spec in self.specs.items()
            if spec.demo is not None and spec.demo.question
        }

    def read(self, files: Sequence[str], modality: str | None = None) -> Image:
        """One image (its files), checked and preprocessed as training did."""
        from umbrella_core.inference.generate import read_images

        ((name, tensor),) = read_images(
            self.loaded,
            [list(files)],
            modalities=[modality] if modality else (),
            installed=self.installed,
        )
        return Image(name, tuple(str(f) for f in files), tensor)

    def _prompt(
        self, images: Sequence[Image], turns: Sequence[Turn], system: str | None = None
    ) -> tuple[list[int], Any]:
        from umbrella_core.inference.generate import encode_prompt

        if not turns or turns[-1].role != "user":
            raise ConfigError("the conversation must end with a question (a user turn)")
        placed = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns if t.role == "user")
        turns = list(turns)
        if placed == 0 and images:
            # The images go before the first question, as in training.
            first = next(i for i, t in enumerate(turns) if t.role == "user")
            content = f"{IMAGE_PLACEHOLDER}\n" * len(images) + turns[first].content
            turns[first] = Turn(role="user", content=content)
        elif placed != len(images):
            raise DataError(
                f"the conversation places {placed} image(s) but {len(images)} were given"
            )
        return encode_prompt(
            self.loaded,
            turns,
            [image.modality for image in images],
            where="the conversation",
            system_prompt=system,
        )

    def reply(
        self,
        images: Sequence[Image],
        turns: Sequence[Turn],
        *,
        max_new_tokens: int = 64,
        system: str | None = None,
    ) -> Reply:
        """The reply to the conversation's last question, to iterate as it is decoded.

        ``system``: a system prompt in place of the run's (``model.system_prompt``).
        """
        ids, chat = self._prompt(images, turns, system)
        return Reply(self, ids, chat, images, max_new_tokens)

    def answer(
        self, images: Sequence[Image], turns: Sequence[Turn], *, max_new_tokens: int = 64
    ) -> Answer:
        """The whole reply to the conversation's last question about ``images``."""
        reply = self.reply(images, turns, max_new_tokens=max_new_tokens)
        for _ in reply:
            pass
        assert reply.answer is not None  # set when the reply has been read to its end
        return reply.answer


class Reply:
    """A reply being decoded: iterating gives the new characters as each token comes.

    The whole reply is decoded again at each token, so a character made of
    several tokens appears once it is whole. After the iteration,
    :attr:`answer` holds the text and the token counts. The model is held
    (the assistant's lock) while the iteration runs.
    """

    def __init__(
        self, assistant: Assistant, ids: list[int], chat: Any, images: Sequence[Image], most: int
    ) -> None:
        self._assistant, self._ids, self._chat = assistant, ids, chat
        self._images, self._most = images, most
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        from umbrella_core.inference.generate import decode, iter_greedy

        loaded = self._assistant.loaded
        tensors = [(image.modality, image.tensor) for image in self._images]
        generated: list[int] = []
        shown = ""
        with self._assistant.lock:
            for token in iter_greedy(
                loaded.model,
                self._ids,
                tensors,
                max_new_tokens=self._most,
                stop_token_ids=self._chat.stop_token_ids,
            ):
                generated.append(token)
                text = decode(loaded.tokenizer, generated)
                if text.startswith(shown) and len(text) > len(shown) and "\ufffd" not in text:
                    yield text[len(shown) :]
                    shown = text
        final = decode(loaded.tokenizer, generated)
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown) :]
        stopped = bool(generated) and generated[-1] in set(self._chat.stop_token_ids)
        self.answer = Answer(final, len(self._ids), len(generated), "stop" if stopped else "length")
