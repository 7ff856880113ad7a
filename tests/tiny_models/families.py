"""Tiny stand-ins for real language-model families, built in code, nothing downloaded.

The core's tests and benchmarks often need "a Llama 3", "a Qwen2.5" or
"a Gemma 3" to check that something works with the conventions of that family:
its special tokens, whether it has a BOS or a pad token, its chat template,
whether the output layer shares the input embeddings, its vocabulary size.
Downloading the real checkpoints is slow and not allowed at run time
(ARCHITECTURE I8), so this module builds small look-alikes:

* :func:`family_tokenizer` trains a byte-level BPE (about 1,000 tokens, in well
  under a second) on a small built-in English corpus, then adds the family's
  real special tokens and its real chat template (copied from the public model
  repository into ``chat_templates/<family>.jinja``, source named at its top).
  Like a real language model's tokenizer, it has no ``<image>`` token: the
  model builder adds that.
* :func:`family_config` is the family's ``transformers`` config with its real
  vocabulary size, tied or untied embeddings as the real one, and bos/eos/pad
  ids that match :func:`family_tokenizer`; everything else is tiny.
* :func:`save_tiny_language_model` writes a randomly initialised model and its
  tokenizer to a folder that ``AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` load.

=========== ======================= ========================================= ========
family      real checkpoint         special tokens (bos / eos / pad)          tied
=========== ======================= ========================================= ========
``llama``   Llama-3.1-8B-Instruct   <|begin_of_text|> / <|eot_id|> / none     no
``qwen2``   Qwen2.5-0.5B-Instruct   none / <|im_end|> / <|endoftext|>         yes
``gemma3``  gemma-3-1b-it           <bos> / <eos> / <pad>                     yes
``phi3``    Phi-3-mini-4k-instruct  <s> / <|endoftext|> / <|endoftext|>       no
``smollm2`` SmolLM2-135M-Instruct   <|im_start|> / <|im_end|> / <|im_end|>    yes
=========== ======================= ========================================= ========

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "FAMILIES",
    "family_chat_template",
    "family_config",
    "family_tokenizer",
    "save_tiny_language_model",
]

#: The families imitated here.
FAMILIES = ("llama", "qwen2", "gemma3", "phi3", "smollm2")

#: The copied templates live beside this module: the fixtures are read from the
#: repository's tests, never from an installed package.
CHAT_TEMPLATES = Path(__file__).with_name("chat_templates")

#: Vocabulary size the byte-level BPE is trained to (before special tokens).
TRAINED_VOCAB_SIZE = 1000


@attrs.frozen
class _Family:
    #: Special tokens given ids first, before the trained vocabulary (as in the
    #: real tokenizer, where e.g. Gemma's <pad> is id 0).
    leading: tuple[str, ...]
    #: Special tokens appended after the trained vocabulary.
    trailing: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    #: Whether ``tokenizer(text)`` puts the bos token first, as the real one does.
    adds_bos: bool
    #: Whether the real byte-level post-processor trims spaces off token offsets.
    trim_offsets: bool
    #: The real pre-tokenizer's split pattern (None: GPT-2's, inside ByteLevel).
    split: str | None
    config_class: str
    vocab_size: int
    tie_word_embeddings: bool


# The real pre-tokenizers split text with these before the byte-level step; the
# Qwen2 one is also what transformers' Qwen2Tokenizer rebuilds on load, so the
# saved tokenizer must have been trained with it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_FAMILIES: dict[str, _Family] = {
    # Llama 3.1 Instruct: eos is <|eot_id|>, <|end_of_text|> ends documents, no pad token.
    "llama": _Family(
        leading=(),
        trailing=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        unk=None,
        adds_bos=True,
        trim_offsets=False,
        split=_LLAMA3_SPLIT,
        config_class="LlamaConfig",
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # Qwen2.5 Instruct: no bos at all, <|im_end|> ends a turn and the sequence.
    "qwen2": _Family(
        leading=(),
        trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        adds_bos=False,
        trim_offsets=False,
        split=_QWEN2_SPLIT,
        config_class="Qwen2Config",
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # Gemma 3: <pad> 0, <eos> 1, <bos> 2, <unk> 3; turns end with <end_of_turn>.
    "gemma3": _Family(
        leading=("<pad>", "<eos>", "<bos>", "<unk>"),
        trailing=("<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        adds_bos=True,
        trim_offsets=False,
        split=None,
        config_class="Gemma3TextConfig",
        vocab_size=262144,
        tie_word_embeddings=True,
    ),
    # Phi-3 mini: Llama-2 style <unk> <s> </s>, then chat tokens; eos is <|endoftext|>.
    "phi3": _Family(
        leading=("<unk>", "<s>", "</s>"),
        trailing=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        adds_bos=True,
        trim_offsets=False,
        split=None,
        config_class="Phi3Config",
        vocab_size=32064,
        tie_word_embeddings=False,
    ),
    # SmolLM2: a GPT-2 style tokenizer (offsets trimmed) whose first ids are chatml tokens.
    "smollm2": _Family(
        leading=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        trailing=(),
        bos="<|im_start|>",
        eos="<|im_end|>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        adds_bos=False,
        trim_offsets=True,
        split=None,
        config_class="LlamaConfig",
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}

# What the tiny models are asked about in the demo and the study templates, plus
# the words of the families' system prompts, so that these merge into whole-word
# tokens as they would in a real vocabulary.
_CORPUS = """\
Which hemisphere holds the lesion? The lesion is in the left hemisphere.
Which hemisphere holds the lesion? The lesion is in the right hemisphere.
Which hemisphere shows the task activation? The activation is in the right hemisphere.
What is the sex of this subject? male. What is the sex of this subject? female.
How old is the subject? 8 years. 9 years. 10 years. 12 years. 15 years. 21 years.
How old is the subject? 34 years. 45 years. 52 years. 63 years. 70 years. 81 years.
What is the diagnosis of this subject? autism. control. schizophrenia. depression.
Are these two subjects of the same sex? yes. no. left right left right male female.
Describe the scan. A post-contrast T1-weighted head with a tumour in one hemisphere.
The diffusion image shows the white matter tracts; the resting-state series is noisy.
The brain has a left and a right hemisphere, separated by the falx and the midline.
Structural scans, functional series and diffusion weighted images of the whole brain.
You are a helpful assistant. You are a helpful AI assistant named SmolLM, trained by
Hugging Face. You are Qwen, created by Alibaba Cloud. You are a careful radiologist.
Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024. Environment: ipython.
system user assistant model USER: ASSISTANT: SYSTEM: Question: Answer: image scan.
The quick brown fox jumps over the lazy dog while the patient lies still in the scanner.
Please answer with one word. Answer in a short sentence. Thank you, that is correct.
The magnetic resonance imaging study of the brain was acquired at three tesla with a
head coil. Motion was small, the signal to noise ratio was good, and no artefacts were
seen. The ventricles are normal in size. There is no mass effect and no midline shift.
The grey matter and white matter differentiation is preserved. Cortical thickness and
volume were measured in every region; the hippocampus is smaller on the left than on the
right. Children, adolescents and adults from several cohorts took part in these studies.
"""


def _check_family(name: str) -> _Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown language-model family {name!r}; these fixtures have: {', '.join(FAMILIES)}"
        ) from None


def family_chat_template(name: str) -> str:
    """The real chat template of family ``name`` (Jinja text, source named at its top)."""
    _check_family(name)
    return (CHAT_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@functools.cache
def _trained_backend_json(name: str) -> str:
    # Training takes a few hundred milliseconds; the JSON is cached and every
    # call builds a fresh tokenizer from it, because callers add tokens.
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.trainers import BpeTrainer

    family = _FAMILIES[name]
    backend = Tokenizer(models.BPE())
    if family.split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        if name == "qwen2":
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE + len(family.leading),
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in family.leading],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = _CORPUS.splitlines()
    backend.train_from_iterator(lines, trainer=trainer)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in family.trailing]
    )
    byte_level = processors.ByteLevel(trim_offsets=family.trim_offsets)
    if family.adds_bos:
        bos_id = backend.token_to_id(family.bos)
        backend.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{family.bos}:0 $A:0",
                    pair=f"{family.bos}:0 $A:0 {family.bos}:1 $B:1",
                    special_tokens=[(family.bos, bos_id)],
                ),
            ]
        )
    else:
        backend.post_processor = byte_level
    return backend.to_str()


def family_tokenizer(name: str) -> Any:
    """A small ``PreTrainedTokenizerFast`` with family ``name``'s special tokens and chat template.

    The vocabulary is a byte-level BPE trained on a built-in English corpus
    (deterministic), so any text encodes and common words are single tokens.
    ``tokenizer(text)`` adds the bos token where the real tokenizer does.

    Raises:
        ValueError: ``name`` is not one of :data:`FAMILIES`.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    family = _check_family(name)
    backend = Tokenizer.from_str(_trained_backend_json(name))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
    )
    tokenizer.chat_template = family_chat_template(name)
    return tokenizer


def family_config(
    name: str,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    **overrides: Any,
) -> Any:
    """The ``transformers`` config of a tiny model of family ``name``.

    Args:
        name: One of :data:`FAMILIES`.
        vocab_size: Rows of the embedding matrix; default the real family's
            (e.g. 262,144 for Gemma 3). It must hold every id of
            :func:`family_tokenizer`.
        hidden_size, intermediate_size, layers, heads, kv_heads: The tiny shape.
        **overrides: Any other config attribute.

    Raises:
        ValueError: Unknown family, or a vocabulary smaller than the tokenizer's.
    """
    import transformers

    family = _check_family(name)
    tokenizer = family_tokenizer(name)
    size = family.vocab_size if vocab_size is None else int(vocab_size)
    if size < len(tokenizer):
        raise ValueError(
            f"vocab_size {size} is smaller than the {name} test tokenizer ({len(tokenizer)} tokens)"
        )
    settings: dict[str, Any] = {
        "vocab_size": size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": family.tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if name == "gemma3":
        # Gemma's default head_dim (256) and attention scale belong to the real width.
        settings["head_dim"] = hidden_size // heads
        settings["query_pre_attn_scalar"] = hidden_size // heads
    settings.update(overrides)
    return getattr(transformers, family.config_class)(**settings)


def save_tiny_language_model(
    name: str, directory: str | Path, *, seed: int = 0, **config_overrides: Any
) -> Path:
    """Write a random tiny model of family ``name`` and its tokenizer to ``directory``.

    The weights are safetensors; the tokenizer carries its chat template. The
    global torch random state is left as it was.

    Args:
        name: One of :data:`FAMILIES`.
        directory: Created if missing.
        seed: Seeds the initial weights (same seed, same weights).
        **config_overrides: Passed to :func:`family_config` (e.g. ``vocab_size=2048``
            keeps the files small).

    Returns:
        ``directory`` as a Path.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = family_config(name, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    family_tokenizer(name).save_pretrained(out)
    return out
