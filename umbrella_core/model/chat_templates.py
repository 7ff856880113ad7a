"""Which chat template a setting of ``model.chat_template`` means, and readying a tokenizer.

``auto`` is the tokenizer's own chat template, else the built-in template of its
family's turn tokens (:func:`family_template`), else ``llava-1.5``; a built-in
name (:data:`TEMPLATE_NAMES`) is a Jinja file in ``umbrella_core/templates/``;
anything else is the path of a ``.jinja`` file.
:func:`prepare_tokenizer` adds the special tokens a built-in template writes
and stores the template on the tokenizer, so a checkpoint carries its format.
Writing conversations with it is :mod:`umbrella_core.model.chat`.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from umbrella_core.errors import ConfigError

__all__ = [
    "DEFAULT_TEMPLATE",
    "SETTING",
    "TEMPLATE_NAMES",
    "TEMPLATE_TOKENS",
    "family_template",
    "has_token",
    "named_template",
    "prepare_tokenizer",
    "resolve_template",
]

#: The built-in templates, by name.
TEMPLATE_NAMES = ("llava-1.5", "chatml", "llama3", "gemma")

#: What ``auto`` means for a tokenizer without a chat template of its own.
DEFAULT_TEMPLATE = "llava-1.5"

#: Special tokens each built-in template writes (beyond the tokenizer's bos/eos).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "llava-1.5": (),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}

SETTING = "model.chat_template"


def named_template(name: str) -> str:
    """The Jinja text of built-in template ``name`` (one of :data:`TEMPLATE_NAMES`)."""
    if name not in TEMPLATE_NAMES:
        raise ConfigError(_unknown(name))
    return _shipped(name)


@functools.cache
def _shipped(name: str) -> str:
    path = resources.files("umbrella_core").joinpath("templates", f"{name}.jinja")
    return path.read_text(encoding="utf-8")


def _unknown(setting: str) -> str:
    return (
        f"{SETTING}: unknown template {setting!r}; use auto, "
        f"{', '.join(TEMPLATE_NAMES)} or the path of a .jinja file"
    )


def _own_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template or None


def resolve_template(tokenizer: Any, setting: str = "auto") -> tuple[str, str]:
    """The template text a setting of ``model.chat_template`` means for ``tokenizer``.

    Returns:
        ``(text, name)``: ``name`` is the built-in name (also for a tokenizer whose
        own template is a built-in one's text), ``tokenizer`` for the tokenizer's
        own template, or the file's path.

    Raises:
        ConfigError: An unknown name or a missing file (the message lists the names).
    """
    setting = str(setting).strip()
    if setting.lower() == "auto":
        own = _own_template(tokenizer)
        if own is not None:
            # A built-in template stored by prepare_tokenizer keeps its name.
            same = [name for name in TEMPLATE_NAMES if named_template(name) == own]
            return own, same[0] if same else "tokenizer"
        family = family_template(tokenizer)
        return named_template(family), family
    if setting.lower() in TEMPLATE_NAMES:
        return named_template(setting.lower()), setting.lower()
    path = Path(setting).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{SETTING}: cannot read {path}: {error}") from None
    if setting.endswith((".jinja", ".j2")) or "/" in setting or "\\" in setting:
        raise ConfigError(
            f"{SETTING}: no file {setting}; give an existing .jinja file, auto, "
            f"or one of {', '.join(TEMPLATE_NAMES)}"
        )
    raise ConfigError(_unknown(setting))


def family_template(tokenizer: Any) -> str:
    """The built-in template whose turn tokens ``tokenizer``'s vocabulary already holds.

    A base model's tokenizer often ships without a chat template (a GGUF file's,
    for one), yet its family's turn tokens were in pretraining (Gemma's
    ``<start_of_turn>``, ChatML's ``<|im_start|>``): writing conversations with
    them beats a template whose markers are plain words. Else :data:`DEFAULT_TEMPLATE`.
    """
    vocab = tokenizer.get_vocab()
    for name in ("gemma", "llama3", "chatml"):
        if all(token in vocab for token in TEMPLATE_TOKENS[name]):
            return name
    return DEFAULT_TEMPLATE


def has_token(tokenizer: Any, token: str) -> bool:
    return token in tokenizer.get_vocab()


def prepare_tokenizer(tokenizer: Any, setting: str = "auto") -> list[str]:
    """Make ``tokenizer`` ready to write conversations as ``setting`` says.

    For a built-in template, adds the special tokens it needs and the
    tokenizer lacks (e.g. ``<|im_start|>`` and ``<|im_end|>`` for ``chatml``);
    then stores the chosen template (built-in, file, or for ``auto`` the
    tokenizer's own, else ``llava-1.5``) as ``tokenizer.chat_template``, so a
    saved checkpoint carries its format and ``auto`` finds it on reload.
    Calling it again changes nothing.

    Returns:
        The tokens added: the model's embeddings must grow to ``len(tokenizer)``.

    Raises:
        ConfigError: See :func:`resolve_template`.
    """
    from tokenizers import AddedToken

    text, name = resolve_template(tokenizer, setting)
    missing = [t for t in TEMPLATE_TOKENS.get(name, ()) if not has_token(tokenizer, t)]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    tokenizer.chat_template = text
    return missing
