"""Conversations written out in the language model's own format (its chat template).

ARCHITECTURE I9: a conversation is rendered as the language model expects it,
and the learned-token mask is exactly the assistant replies and their
end-of-turn token.

* The setting ``model.chat_template`` picks the format: ``auto`` (the
  tokenizer's own chat template, else ``llava-1.5``), a built-in name
  (:data:`TEMPLATE_NAMES`, Jinja files in ``umbrella_core/templates/``) or a
  ``.jinja`` file.
* :func:`prepare_tokenizer` readies a tokenizer for the setting: it adds the
  special tokens a built-in template needs and stores the template as the
  tokenizer's ``chat_template``, so a saved checkpoint carries its format.
* :func:`chat_format` compiles the template once into a :class:`ChatFormat`,
  whose :meth:`ChatFormat.encode` turns a conversation into token ids and
  labels, with each ``<image>`` placeholder expanded to its modality's token
  count (I3).

How the learned tokens are found, for any template (few have ``{% generation %}``
markers): for assistant turn ``i`` the template renders the conversation up to
turn ``i`` with the generation prompt (``P_i``) and up to and including turn
``i`` (``F_i``). Where both are prefixes of the whole rendering, the learned
characters run from the end of ``P_i`` to the end of the first special token
after it (the end-of-turn); what a template writes after that (a newline, a
final eos) is not learned. A template that writes history differently from a
fresh turn (a reasoning block dropped from past turns, say) falls back to
finding the reply's text in the rendering. The text is tokenized once with
character offsets; where a token straddles the end of a generation prompt (a
BPE merging ``ASSISTANT: `` with ``left``), the text is cut there, so training
sees the prompt tokens that generation feeds.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.errors import ConfigError, DataError, TokenCountError
from umbrella_core.model.chat_templates import (
    SETTING,
    TEMPLATE_TOKENS,
    has_token,
    resolve_template,
)
from umbrella_core.types import IMAGE_PLACEHOLDER, Turn

__all__ = ["ChatFormat", "Encoded", "chat_format"]

_PUBLIC = ("template", "name", "system_prompt", "end_of_turn", "stop_token_ids")


@attrs.frozen
class Encoded:
    """Token ids of one conversation and their labels (``IGNORE_INDEX`` where not learned)."""

    input_ids: list[int]
    labels: list[int]


def _compile(template: str) -> Any:
    # transformers' own compiled template (cached by text): the same sandbox,
    # filters (tojson) and globals (raise_exception, strftime_now) as
    # apply_chat_template, so the text is byte for byte what it renders.
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: the same environment, built here
        return _sandbox().from_string(template)
    return _compile_jinja_template(template)


def _sandbox() -> Any:
    import json
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, **options: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **options)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _special_tokens(tokenizer: Any) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    tokens.discard(IMAGE_PLACEHOLDER)
    return sorted((t for t in tokens if t), key=len, reverse=True)


class _Backend:
    """Token ids with untrimmed character offsets, for one tokenizer.

    Where the Rust tokenizer's post-processor trims spaces off the offsets
    (GPT-2 style), which would hide a token that straddles a cut, a copy
    without it is used (the post-processor otherwise only adds bos/eos, not
    wanted here, as in apply_chat_template). Tokenizers without a Rust backend
    are cut at every boundary instead.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        # The most characters one token can stand for (4x for normalisers that
        # compose characters): a text of n characters is at least
        # n / longest tokens, known before it is rendered or tokenised.
        self.longest = 4 * max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.rust = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            probe = " left  right"
            offsets = backend.encode(probe, add_special_tokens=False).offsets
            covered = [s for s, _ in offsets[:1]] + [e for _, e in offsets[-1:]]
            contiguous = all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
            if covered == [0, len(probe)] and contiguous:
                self.rust = backend  # offsets untrimmed: no copy of a large vocabulary
            else:
                from tokenizers import Tokenizer

                rust = Tokenizer.from_str(backend.to_str())
                rust.post_processor = None
                self.rust = rust

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` and their character spans (empty spans without a Rust backend)."""
        if not text:
            return [], []
        if self.rust is not None:
            enc = self.rust.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), []


def _refuse_too_long(
    messages: Sequence[Mapping[str, str]],
    image_modalities: Sequence[str],
    backend: _Backend,
    tokens_per_modality: Mapping[str, int],
    max_length: int,
    where: str,
) -> None:
    """Raise DataError when the conversation's fewest possible tokens exceed ``max_length``."""
    # A conversation far too long is refused before the template renders it
    # and the tokenizer splits it (a 10 MB one took 40 s and 2 GB to refuse).
    chars = sum(len(m["content"]) for m in messages)
    chars -= len(IMAGE_PLACEHOLDER) * len(image_modalities)
    least = chars // backend.longest + sum(tokens_per_modality.get(m, 0) for m in image_modalities)
    if least > max_length:
        raise DataError(
            f"{where}: the conversation is at least {least} tokens long ({chars} "
            f"characters, images included) but the model takes at most {max_length}; "
            "shorten it or raise model.max_length",
            source=where,
            field="conversation",
        )


def _check_images(
    placeholders: int,
    image_modalities: Sequence[str],
    tokens_per_modality: Mapping[str, int],
    where: str,
) -> None:
    """Raise unless there is one placeholder per image and every image's modality is active."""
    if placeholders > len(image_modalities):
        raise TokenCountError(f"{where}: more {IMAGE_PLACEHOLDER} placeholders than images")
    if placeholders < len(image_modalities):
        raise TokenCountError(
            f"{where}: {len(image_modalities)} image(s) but "
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s)"
        )
    for modality in image_modalities:
        if modality not in tokens_per_modality:
            raise DataError(
                f"{where}: image of modality {modality!r} is not active in this run",
                source=where,
                field="images",
            )


@attrs.frozen(eq=False)
class ChatFormat:
    """A compiled chat template and what it needs to encode conversations.

    Build it with :func:`chat_format`; it is cheap to keep and to pickle.

    Attributes:
        template: The Jinja text.
        name: The built-in name, ``tokenizer`` or the template file.
        system_prompt: System message put first when a conversation has none.
        end_of_turn: The token the template writes after each reply (``<|eot_id|>``,
            ``<|im_end|>``, ``<end_of_turn>``, ``</s>``...), or None.
        stop_token_ids: eos and the end-of-turn: generation stops at any of them.
    """

    template: str
    name: str
    system_prompt: str
    end_of_turn: str | None
    stop_token_ids: tuple[int, ...]
    _compiled: Any = attrs.field(repr=False)
    _variables: Mapping[str, Any] = attrs.field(repr=False)
    _special: re.Pattern[str] | None = attrs.field(repr=False)
    _backends: dict[int, _Backend] = attrs.field(factory=dict, repr=False)

    # DataLoader workers started with spawn (macOS, Windows) get a pickled copy:
    # the compiled template is not picklable, so it is compiled again there.
    def __getstate__(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in _PUBLIC}
        state["variables"], state["special"] = self._variables, self._special
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name if name in _PUBLIC else f"_{name}", value)
        object.__setattr__(self, "_compiled", _compile(state["template"]))
        object.__setattr__(self, "_backends", {})

    # -- rendering ---------------------------------------------------------------

    def messages(self, turns: Sequence[Turn | Mapping[str, str]]) -> list[dict[str, str]]:
        """``turns`` as chat messages, with the system prompt first where set and missing."""
        out = [
            {"role": str(t["role"]), "content": str(t["content"])}
            if isinstance(t, Mapping)
            else {"role": t.role, "content": t.content}
            for t in turns
        ]
        if self.system_prompt and not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": self.system_prompt})
        return out

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False
    ) -> str:
        """The template's text for ``messages`` (as ``tokenizer.apply_chat_template``
        with ``tokenize=False`` gives it)."""
        return self._compiled.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self._variables
        )

    def _render(self, messages: Sequence[Mapping[str, str]], generation: bool, where: str) -> str:
        import jinja2

        try:
            return self.render(messages, add_generation_prompt=generation)
        except jinja2.TemplateError as error:
            raise DataError(
                f"{where}: the chat template ({self.name}) refuses this conversation: {error}",
                source=where,
                field="conversation",
            ) from None

    def _end_of_turn_at(self, text: str, start: int, stop: int) -> re.Match[str] | None:
        if self._special is None:
            return None
        return self._special.search(text, start, stop)

    def learned_spans(
        self, messages: Sequence[Mapping[str, str]], text: str, *, where: str = ""
    ) -> list[tuple[int, int]]:
        """Character spans of ``text`` (the rendering of ``messages``) that are learned:
        each assistant reply and its end-of-turn token."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        last = len(messages) - 1
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = None
            if i > 0:
                prompt = self._render(messages[:i], True, where)
                upto = text if i == last else self._render(messages[: i + 1], False, where)
                start = len(prompt)
                if start >= cursor and text.startswith(prompt) and upto.startswith(prompt):
                    eot = self._end_of_turn_at(upto, start, len(upto))
                    end = eot.end() if eot else start + len(upto[start:].rstrip())
                    if text[:end] == upto[:end] and message["content"].strip() in text[start:end]:
                        span = (start, end)
            if span is None:
                span = self._find_reply(message["content"], text, cursor, where)
            spans.append(span)
            cursor = span[1]
        return spans

    def _find_reply(self, content: str, text: str, cursor: int, where: str) -> tuple[int, int]:
        # The template writes this turn differently in history than as a fresh
        # turn: find the reply itself and the end-of-turn right after it.
        reply = content.strip()
        start = text.find(reply, cursor)
        if start < 0:
            raise DataError(
                f"{where}: the chat template ({self.name}) does not write out the "
                f"assistant reply {reply[:40]!r}, so it cannot be learned",
                source=where,
                field="conversation",
            )
        end = start + len(reply)
        eot = self._end_of_turn_at(text, end, len(text))
        if eot is not None and not text[end : eot.start()].strip():
            end = eot.end()
        return start, end

    # -- encoding ----------------------------------------------------------------

    def _backend(self, tokenizer: Any) -> _Backend:
        backend = self._backends.get(id(tokenizer))
        # Rebuilt when tokens were added since (the model builder adds <image>).
        if backend is None or backend.tokenizer is not tokenizer or backend.size != len(tokenizer):
            backend = self._backends[id(tokenizer)] = _Backend(tokenizer)
        return backend

    def encode(
        self,
        turns: Sequence[Turn | Mapping[str, str]],
        image_modalities: Sequence[str],
        *,
        tokenizer: Any,
        image_token_id: int,
        tokens_per_modality: Mapping[str, int],
        max_length: int,
        add_generation_prompt: bool = False,
        where: str = "",
    ) -> Encoded:
        """Token ids and labels of one conversation.

        Args:
            turns: The conversation.
            image_modalities: Modality of each image, in placeholder order.
            tokenizer: The tokenizer the template was made for.
            image_token_id: Id of the image token; each placeholder becomes
                ``tokens_per_modality[modality]`` of them (I3).
            tokens_per_modality: Image tokens per image of each modality.
            max_length: Longest sequence the model takes; longer is a DataError
                (image tokens are never truncated).
            add_generation_prompt: End with the generation prompt, for generation
                (a last assistant turn is dropped). The ids are then a prefix of
                the whole conversation's ids.
            where: Where the record came from, for error messages.

        Raises:
            TokenCountError: Placeholders and images disagree in number.
            DataError: An image of an inactive modality, a conversation the
                template refuses, or one longer than ``max_length``.
        """
        messages = self.messages(turns)
        if add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        backend = self._backend(tokenizer)
        _refuse_too_long(
            messages, image_modalities, backend, tokens_per_modality, max_length, where
        )
        text = self._render(messages, add_generation_prompt, where)
        spans = self.learned_spans(messages, text, where=where)
        pieces = text.split(IMAGE_PLACEHOLDER)
        _check_images(len(pieces) - 1, image_modalities, tokens_per_modality, where)
        ids, labels = self._ids_and_labels(
            backend, pieces, spans, image_modalities, image_token_id, tokens_per_modality
        )
        if len(ids) > max_length:
            raise DataError(
                f"{where}: the conversation is {len(ids)} tokens long (images included) but the "
                f"model takes at most {max_length}; shorten it or raise model.max_length",
                source=where,
                field="conversation",
            )
        return Encoded(ids, labels)

    @classmethod
    def _ids_and_labels(
        cls,
        backend: _Backend,
        pieces: list[str],
        spans: list[tuple[int, int]],
        image_modalities: Sequence[str],
        image_token_id: int,
        tokens_per_modality: Mapping[str, int],
    ) -> tuple[list[int], list[int]]:
        """Ids and labels of the text ``pieces``, with each image's tokens between two of them."""
        cuts = sorted({c for span in spans for c in span})
        ids: list[int] = []
        labels: list[int] = []
        offset = 0
        for index, piece in enumerate(pieces):
            if index:
                ids.extend([image_token_id] * tokens_per_modality[image_modalities[index - 1]])
                labels.extend([IGNORE_INDEX] * tokens_per_modality[image_modalities[index - 1]])
                offset += len(IMAGE_PLACEHOLDER)
            cls._add_piece(backend, piece, offset, spans, cuts, ids, labels)
            offset += len(piece)
        return ids, labels

    @staticmethod
    def _add_piece(
        backend: _Backend,
        piece: str,
        offset: int,
        spans: list[tuple[int, int]],
        cuts: list[int],
        ids: list[int],
        labels: list[int],
    ) -> None:
        """Append the ids and labels of ``piece`` (which starts at ``offset`` of the text)."""
        inner = [c - offset for c in cuts if offset < c < offset + len(piece)]
        if backend.rust is None:
            # No offsets: cut at every span boundary, so each part is learned whole or not.
            for a, b in itertools.pairwise([0, *inner, len(piece)]):
                part = backend.encode(piece[a:b])[0]
                learned = any(s <= offset + a and offset + b <= e for s, e in spans)
                ids += part
                labels += part if learned else [IGNORE_INDEX] * len(part)
            return
        piece_ids, offsets = backend.encode(piece)
        straddled = [c for c in inner if any(s < c < e for s, e in offsets)]
        if straddled:
            # A token crosses a generation prompt's end: tokenize the two sides
            # apart, as generation (which only has the prompt) does.
            piece_ids, offsets = [], []
            for a, b in itertools.pairwise([0, *straddled, len(piece)]):
                part_ids, part_offsets = backend.encode(piece[a:b])
                piece_ids += part_ids
                offsets += [(s + a, e + a) for s, e in part_offsets]
        ids += piece_ids
        span_index = 0
        for token, (s, e) in zip(piece_ids, offsets, strict=True):
            s, e = s + offset, e + offset
            while span_index < len(spans) and spans[span_index][1] <= s:
                span_index += 1
            inside = span_index < len(spans) and spans[span_index][0] < max(e, s + 1)
            labels.append(token if inside else IGNORE_INDEX)


def chat_format(tokenizer: Any, setting: str = "auto", system_prompt: str = "") -> ChatFormat:
    """Compile the template ``setting`` means for ``tokenizer`` (see :func:`resolve_template`).

    Raises:
        ConfigError: An unknown name, a missing file, or a built-in template
            whose special tokens the tokenizer lacks (:func:`prepare_tokenizer`
            adds them).
    """
    text, name = resolve_template(tokenizer, setting)
    missing = [t for t in TEMPLATE_TOKENS.get(name, ()) if not has_token(tokenizer, t)]
    if missing:
        raise ConfigError(
            f"{SETTING}: {name} writes {', '.join(missing)}, which the tokenizer lacks; "
            "prepare it with umbrella_core.model.chat.prepare_tokenizer"
        )
    try:
        compiled = _compile(text)
    except Exception as error:  # jinja2.TemplateSyntaxError and friends
        raise ConfigError(f"{SETTING}: {name} is not a valid Jinja template: {error}") from None
    special = _special_tokens(tokenizer)
    pattern = re.compile("|".join(re.escape(t) for t in special)) if special else None
    variables = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    probe = ChatFormat(
        template=text,
        name=name,
        system_prompt=str(system_prompt or ""),
        end_of_turn=None,
        stop_token_ids=(),
        compiled=compiled,
        variables=variables,
        special=pattern,
    )
    end_of_turn = _probe_end_of_turn(probe)
    stops: list[int] = []
    for token_id in (
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None,
    ):
        if token_id is not None and token_id not in stops:
            stops.append(int(token_id))
    return attrs.evolve(probe, end_of_turn=end_of_turn, stop_token_ids=tuple(stops))


def _probe_end_of_turn(chat: ChatFormat) -> str | None:
    messages = chat.messages(
        [
            {"role": "user", "content": "Which hemisphere holds the lesion?"},
            {"role": "assistant", "content": "left"},
        ]
    )
    try:
        text = chat.render(messages)
        start, end = chat.learned_spans(messages, text, where=f"{SETTING} {chat.name}")[0]
    except Exception as error:
        raise ConfigError(
            f"{SETTING}: {chat.name} cannot write a user/assistant exchange: {error}"
        ) from None
    match = chat._end_of_turn_at(text, start, end)
    last = None
    while match is not None:
        last = match
        match = chat._end_of_turn_at(text, match.end(), end)
    return last.group(0) if last is not None and last.end() == end else None
