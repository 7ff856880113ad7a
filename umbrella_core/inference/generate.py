"""Answers from a model: greedy decoding with the images spliced in, and ``umbrella generate``.

:func:`greedy_generate` embeds the images once (each modality through its own
patch embedder, as in training), splices them at their placeholders, and then
decodes one token at a time from the language model's KV cache. It computes
what the training forward computes, so its first token is the teacher-forced
argmax and, whenever the model answers a held-out question exactly, the text is
the reference (:func:`umbrella_core.evaluation.metrics.generated_accuracy`).
"""

from __future__ import annotations

import fnmatch
import functools
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from umbrella_core.data.conversation import Tokenization
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.types import IMAGE_PLACEHOLDER, ModalitySpec, Turn

if TYPE_CHECKING:  # pragma: no cover
    from umbrella_core.types.batch import Batch

__all__ = [
    "Loaded",
    "load_for_inference",
    "guess_modality",
    "with_placeholders",
    "greedy_generate",
    "iter_greedy",
    "greedy_generate_batch",
    "read_images",
    "encode_prompt",
    "resolve_modality",
    "generate_answer",
    "record_prompt",
    "render_prompt",
    "save_inputs",
]


@attrs.define
class Loaded:
    """A checkpoint ready to answer: the model (in eval mode, on its device) and how to
    read images as its run did."""

    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    config: Any
    #: The checkpoint's modalities with the run's geometry and preprocessing settings.
    specs: dict[str, ModalitySpec]

    def tokenization(self, system_prompt: str | None = None) -> Tokenization:
        """How a conversation becomes the checkpoint's tokens: its tokenizer carries the chat
        template it was trained with (``auto`` finds it), its run configuration the system
        prompt (unless ``system_prompt`` is given) and the longest sequence."""
        from umbrella_core.model.chat import chat_format

        system = self.config.model.system_prompt if system_prompt is None else system_prompt
        return Tokenization.of(
            self.tokenizer,
            self.model.image_token_id,
            self.specs,
            self.config.model.max_length,
            chat_format(self.tokenizer, "auto", system),
        )


def load_for_inference(checkpoint: str | os.PathLike, pm: Any, *, device: Any = None) -> Loaded:
    """Load an UMBRELLA checkpoint for generation or evaluation.

    The checkpoint's ``umbrella.json`` holds the run configuration; its
    ``data.preprocessing`` settings are applied to the modalities, so images
    are read exactly as in training.
    """
    import torch

    from umbrella_core.config import RunConfig, structure
    from umbrella_core.data.studies import configure_spec
    from umbrella_core.model.build import load_checkpoint

    model, tokenizer, meta = load_checkpoint(checkpoint, pm)
    stored = meta.get("config")
    try:
        config = structure(RunConfig, stored) if stored else RunConfig()
    except ConfigError as exc:
        raise ConfigError(f"{checkpoint}: the run configuration it holds: {exc}") from None
    specs = {
        name: configure_spec(spec, config.data.preprocessing.get(name))
        for name, spec in model.specs.items()
    }
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return Loaded(model, tokenizer, meta, config, specs)


def guess_modality(path: str, specs: Mapping[str, ModalitySpec]) -> str:
    """The modality whose ``file_patterns`` match the file name.

    Raises:
        ConfigError: no modality or more than one matches (the message lists
            the patterns and says to give ``--modality``).
    """
    name = os.path.basename(path)
    matches = [
        m
        for m, spec in specs.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.file_patterns)
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(
            f"{path}: the file name fits modalities {', '.join(matches)}; give --modality"
        )
    known = "; ".join(
        f"{m}: {', '.join(spec.file_patterns) or '(none)'}" for m, spec in specs.items()
    )
    raise ConfigError(
        f"{path}: cannot tell the modality from the file name ({known}); give --modality"
    )


def with_placeholders(prompt: str, n_images: int) -> str:
    """``prompt`` with one ``<image>`` line per image in front, unless it places them itself."""
    if IMAGE_PLACEHOLDER in prompt:
        return prompt
    return f"{IMAGE_PLACEHOLDER}\n" * n_images + prompt


def _prompt_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[tuple[str, Any]]],
    pad_token_id: int,
    device: Any,
) -> Batch:
    """The prompts as the collator batches them for generation (left padding, no labels),
    on ``device``."""
    from umbrella_core.data.collate import UmbrellaCollator
    from umbrella_core.types.batch import batch_to

    # Modalities the model lacks are left in: the model names them (ModelError).
    given = {m for row in images for m, _ in row}
    order = (*model.modalities, *sorted(given - set(model.modalities)))
    items = [
        {
            "input_ids": list(prompt),
            "images": list(row),
            "key": "+".join(dict.fromkeys(m for m, _ in row)) or "text",
        }
        for prompt, row in zip(prompts, images, strict=True)
    ]
    batch = UmbrellaCollator(pad_token_id, order, padding_side="left")(items)
    return batch_to(batch, device)


def greedy_generate(
    model: Any,
    input_ids: Sequence[int],
    images: Sequence[tuple[str, Any]],
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    stop_token_ids: Collection[int] = (),
) -> list[int]:
    """Greedy continuation of one prompt (its image placeholders already expanded).

    Args:
        model: An :class:`~umbrella_core.model.umbrella.UmbrellaModel`.
        input_ids: The prompt's token ids, ending with the assistant prefix.
        images: ``(modality, tensor (channels, *shape))`` in placeholder order.
        max_new_tokens: Most tokens to generate.
        eos_token_id: Stop after this token (it is returned with the rest).
        stop_token_ids: Stop after any of these too: a chat format's
            ``stop_token_ids`` (eos and the end-of-turn token).

    Returns:
        The generated token ids.
    """
    return list(
        iter_greedy(
            model,
            input_ids,
            images,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            stop_token_ids=stop_token_ids,
        )
    )


def iter_greedy(
    model: Any,
    input_ids: Sequence[int],
    images: Sequence[tuple[str, Any]],
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    stop_token_ids: Collection[int] = (),
) -> Iterator[int]:
    """:func:`greedy_generate`, one token at a time as each is decoded (for streaming)."""
    import torch

    stops = set(stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            batch = _prompt_batch(model, [input_ids], [images], 0, device)
            features, _ = model.image_features(batch["pixel_values"])
            embeds = model.splice(
                batch["input_ids"], features, batch["image_modalities"], batch["image_places"]
            )
            attention = batch["attention_mask"]
            llava = model.llava
            out = llava(
                inputs_embeds=embeds, attention_mask=attention, use_cache=True, logits_to_keep=1
            )
            for count in range(1, max_new_tokens + 1):
                token = int(out.logits[0, -1].argmax())
                yield token
                if token in stops or count == max_new_tokens:
                    break
                attention = torch.cat([attention, attention.new_ones((1, 1))], dim=1)
                step = llava.get_input_embeddings()(
                    torch.tensor([[token]], dtype=torch.long, device=device)
                )
                out = llava(
                    inputs_embeds=step,
                    attention_mask=attention,
                    use_cache=True,
                    logits_to_keep=1,
                    **_kv_cache(llava, out),
                )
    finally:
        model.train(was_training)


def greedy_generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[tuple[str, Any]]],
    *,
    max_new_tokens: int = 32,
    pad_token_id: int = 0,
    stop_token_ids: Collection[int] = (),
    all_steps: bool = False,
) -> list[list[int]]:
    """:func:`greedy_generate` of several prompts at once (left padding, one KV cache).

    Rows are padded on the left so that every row's next token is at the last
    position; each row's positions count its own tokens only, so a row's
    answer is the one :func:`greedy_generate` gives it alone (up to float
    summation order).

    Args:
        prompts: Token ids per row, placeholders expanded.
        images: ``(modality, tensor)`` per image of each row, in placeholder order.
        all_steps: Decode ``max_new_tokens`` steps even when every row has
            stopped: ranks of a distributed run must run the same passes.

    Returns:
        Per row, the generated ids up to and including the first stop token.
    """
    import torch

    if not prompts:
        return []
    stops = set(stop_token_ids)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = _prompt_batch(model, prompts, images, pad_token_id, device)
    attention = batch["attention_mask"]
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    try:
        with torch.no_grad():
            features, _ = model.image_features(batch["pixel_values"])
            embeds = model.splice(
                batch["input_ids"], features, batch["image_modalities"], batch["image_places"]
            )
            positions = (attention.cumsum(1) - 1).clamp(min=0)
            llava = model.llava
            out = llava(
                inputs_embeds=embeds,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            last = positions[:, -1:]
            for step in range(max_new_tokens):
                tokens = out.logits[:, -1].argmax(-1)
                for row, token in enumerate(tokens.tolist()):
                    if not done[row]:
                        generated[row].append(token)
                        done[row] = token in stops
                if step == max_new_tokens - 1 or (all(done) and not all_steps):
                    break
                attention = torch.cat([attention, attention.new_ones((len(prompts), 1))], dim=1)
                last = last + 1
                out = llava(
                    inputs_embeds=llava.get_input_embeddings()(tokens[:, None]),
                    attention_mask=attention,
                    position_ids=last,
                    use_cache=True,
                    logits_to_keep=1,
                    **_kv_cache(llava, out),
                )
    finally:
        model.train(was_training)
    return generated


def _kv_cache(llava: Any, out: Any) -> dict[str, Any]:
    """The key/value cache of ``out`` under the argument name ``llava.forward`` takes.

    transformers 5 renames ``past_key_values`` to ``cache`` (the old name is
    deprecated, and goes in 5.40); earlier 5.x releases know only the old one.
    """
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    # Declared a plain type: mypy matches type[Any] against functools.cache's
    # Hashable by its instances' __hash__, though a class is hashable.
    kind: type = type(llava)
    return {_cache_argument(kind): cache}


@functools.cache
def _cache_argument(cls: type[Any]) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def record_prompt(dataset: Any, index: int) -> tuple[list[int], list[tuple[str, Any]]]:
    """The prompt ids (up to the last answer, which is left out) and images of item ``index``
    of a :class:`~umbrella_core.data.dataset.RecordDataset`."""
    record_index, window = dataset.items[index]
    record = dataset.records[record_index]
    encoded = dataset.encode(record, add_generation_prompt=True)
    return encoded.input_ids, dataset.images(record, window)


def read_images(
    loaded: Loaded,
    images: Sequence[Sequence[str]],
    *,
    modalities: Sequence[str] = (),
    installed: Mapping[str, ModalitySpec] | None = None,
) -> list[tuple[str, Any]]:
    """Each image as the checkpoint's run read it: ``(modality, tensor)`` in order.

    Args:
        images: The files of each image (one, or one per channel, e.g. FA and MD maps).
        modalities: The modality of each image, or one for all; guessed from
            the file names by the plugins' ``file_patterns`` where not given.
        installed: Every installed modality, to guess among (so that a file of
            a modality the checkpoint lacks is named as such); default: the
            checkpoint's.

    Raises:
        DataError: a file is missing or refused by the checks training applies.
        ConfigError: a modality cannot be told or the checkpoint lacks it.
    """
    from umbrella_core.data.checks import check_image, decoded_problems
    from umbrella_core.data.dataset import load_image

    if not images:
        raise ConfigError("give at least one --image")
    if modalities and len(modalities) not in (1, len(images)):
        raise ConfigError(
            f"{len(modalities)} --modality values for {len(images)} images: give one, "
            "or one per --image"
        )
    specs = loaded.specs
    names: list[str] = []
    for i, files in enumerate(images):
        for path in files:
            if not Path(path).is_file():
                raise DataError(f"{path}: image file not found")
        if modalities:
            given = modalities[0] if len(modalities) == 1 else modalities[i]
            name = resolve_modality(given, specs)
        else:
            name = guess_modality(files[0], {**dict(installed or {}), **specs})
        if name not in specs:
            raise ConfigError(
                f"{files[0]}: a {name} image, but the checkpoint was trained on "
                f"{', '.join(specs)}; give --modality"
            )
        # Judged as training judged its images (umbrella_core.data.checks).
        problems = check_image(specs[name], tuple(files), decode=False)
        if problems:
            raise DataError("; ".join(problems))
        names.append(name)
    read = []
    for name, files in zip(names, images, strict=True):
        tensor = load_image(specs[name], tuple(files), where=files[0])
        # An image training would have refused (all zeros, NaN) gets no answer either.
        problems = decoded_problems(files, tensor.numpy())
        if problems:
            raise DataError("; ".join(problems))
        read.append((name, tensor))
    return read


def encode_prompt(
    loaded: Loaded,
    turns: Sequence[Turn],
    modalities: Sequence[str],
    *,
    where: str = "--prompt",
    system_prompt: str | None = None,
) -> tuple[list[int], Any]:
    """The prompt ids of a conversation that ends with a user turn, and its chat format.

    The checkpoint's :meth:`Loaded.tokenization` encodes it; each ``<image>``
    expands to its modality's token count, in ``modalities`` order.
    """
    tokenization = loaded.tokenization(system_prompt)
    encoded = tokenization.encode_turns(turns, modalities, add_generation_prompt=True, where=where)
    return encoded.input_ids, tokenization.chat


def generate_answer(
    loaded: Loaded,
    images: Sequence[Sequence[str]],
    prompt: str,
    *,
    modalities: Sequence[str] = (),
    max_new_tokens: int = 64,
    installed: Mapping[str, ModalitySpec] | None = None,
    seen: Callable[[list[int], list[tuple[str, Any]]], None] | None = None,
) -> str:
    """``umbrella generate``: the answer to ``prompt`` about the images (:func:`read_images`).

    ``seen(prompt_ids, images)``, when given, gets what the model is given: the
    prompt's token ids and each image as it reads it (``(modality, tensor)``).
    """
    tensors = read_images(loaded, images, modalities=modalities, installed=installed)
    turn = Turn(role="user", content=with_placeholders(prompt, len(images)))
    ids, chat = encode_prompt(loaded, [turn], [name for name, _ in tensors])
    if seen is not None:
        seen(list(ids), list(tensors))
    generated = greedy_generate(
        loaded.model,
        ids,
        tensors,
        max_new_tokens=max_new_tokens,
        stop_token_ids=chat.stop_token_ids,
    )
    return decode(loaded.tokenizer, generated)


def render_prompt(tokenizer: Any, ids: Sequence[int], image_token_id: int) -> str:
    """The prompt as the language model reads it: special tokens kept, each run of image
    tokens shown once as ``<image x N>``."""
    parts: list[str] = []
    run: list[int] = []
    count = 0
    for token in list(ids) + [None]:
        if token == image_token_id:
            if run:
                parts.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            count += 1
            continue
        if count:
            parts.append(f"<image x {count}>")
            count = 0
        if token is not None:
            run.append(int(token))
    if run:
        parts.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(parts)


def save_inputs(images: Sequence[tuple[str, Any]], folder: str | os.PathLike) -> list[Path]:
    """Each image as the model reads it, as NIfTI (channels last; voxel grid, no anatomy:
    the affine is the identity), ``input-1-t1.nii.gz``, ... in placeholder order."""
    import numpy as np

    from umbrella_core.imaging import save_nifti

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (modality, tensor) in enumerate(images, start=1):
        array = np.asarray(tensor.detach().cpu().float(), dtype=np.float32)
        array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
        elif array.ndim == 5:  # a 4D series of several channels: frames x channels in one axis
            array = array.reshape(*array.shape[:3], -1)
        path = folder / f"input-{index}-{modality}.nii.gz"
        written.append(Path(save_nifti(path, array, np.eye(4))))
    return written


def resolve_modality(name: str, specs: Mapping[str, ModalitySpec]) -> str:
    """A modality name or alias (case-insensitive) as one of ``specs``' names."""
    wanted = name.strip().lower()
    for canonical, spec in specs.items():
        if wanted == canonical or wanted in spec.aliases:
            return canonical
    raise ConfigError(
        f"--modality {name}: the checkpoint has no such modality (it has {', '.join(specs)})"
    )
