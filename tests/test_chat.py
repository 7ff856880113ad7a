"""Conversations are in the language model's own format, and only replies are learned (I9)."""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_models.families import FAMILIES, family_tokenizer
from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.data.conversation import Tokenization
from umbrella_core.errors import ConfigError, DataError, TokenCountError
from umbrella_core.model.chat import chat_format
from umbrella_core.model.chat_templates import TEMPLATE_NAMES, named_template, prepare_tokenizer
from umbrella_core.model.tokenizer import IMAGE_TOKEN, build_byte_tokenizer
from umbrella_core.types import Turn

TOKENS = {"t1": 3, "fmri": 5}

SINGLE = [
    Turn(role="user", content="<image>\nWhich hemisphere holds the lesion?"),
    Turn(role="assistant", content="left"),
]
MULTI = [
    Turn(role="user", content="<image> and <image>\nWhich hemisphere holds the lesion?"),
    Turn(role="assistant", content="The lesion is in the right hemisphere."),
    Turn(role="user", content="How old is the subject?"),
    Turn(role="assistant", content="63 years"),
]
CONVERSATIONS = {
    "single": (SINGLE, ["t1"], ""),
    "multi": (MULTI, ["t1", "fmri"], ""),
    "system": (MULTI, ["fmri", "t1"], "You are a careful radiologist."),
}

#: (tokenizer, setting): every family with its own template, every built-in
#: template on the byte tokenizer, and built-ins on family tokenizers that lack
#: their special tokens until prepare_tokenizer adds them.
CASES = (
    [(name, "auto") for name in FAMILIES]
    + [("byte", name) for name in TEMPLATE_NAMES]
    + [("llama", "chatml"), ("qwen2", "llama3"), ("phi3", "gemma"), ("smollm2", "llava-1.5")]
    + [("gemma3", "llava-1.5")]
)


def _tokenizer(name: str):
    tokenizer = build_byte_tokenizer() if name == "byte" else family_tokenizer(name)
    if name != "byte":
        # What the model builder does: a language model's tokenizer lacks <image>.
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True)], special_tokens=True)
    return tokenizer


def _prepared(name: str, setting: str):
    tokenizer = _tokenizer(name)
    prepare_tokenizer(tokenizer, setting)
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _encode(chat, tokenizer, image_id, turns, modalities, **kwargs):
    return chat.encode(
        turns,
        modalities,
        tokenizer=tokenizer,
        image_token_id=image_id,
        tokens_per_modality=TOKENS,
        max_length=4096,
        **kwargs,
    )


def _collapse(ids, image_id, modalities):
    """The ids with each image's run of tokens back to one placeholder, checking run lengths."""
    out, runs = [], []
    for token, group in itertools.groupby(ids):
        group = list(group)
        if token == image_id:
            runs.append(len(group))
            out.append(token)
        else:
            out += group
    assert runs == [TOKENS[m] for m in modalities]  # each image its own modality's count (I3)
    return out


def _learned_runs(tokenizer, encoded):
    runs = []
    for learned, group in itertools.groupby(
        zip(encoded.input_ids, encoded.labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX
    ):
        group = list(group)
        if learned:
            assert all(token == label for token, label in group)
            runs.append(tokenizer.decode([t for t, _ in group]))
    return runs


def _messages(chat, turns):
    return chat.messages(turns)


def _expand(ids, image_id, modalities):
    out, images = [], iter(modalities)
    for token in ids:
        out += [token] * TOKENS[next(images)] if token == image_id else [token]
    return out


@pytest.mark.parametrize(("tokenizer_name", "setting"), CASES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_encoding_is_the_template_rendering_with_only_replies_learned(
    tokenizer_name, setting, conversation
):
    turns, modalities, system = CONVERSATIONS[conversation]
    tokenizer, image_id = _prepared(tokenizer_name, setting)
    chat = chat_format(tokenizer, setting, system)
    messages = _messages(chat, turns)
    if system:
        assert messages[0] == {"role": "system", "content": system}
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert chat.render(messages) == rendered

    encoded = _encode(chat, tokenizer, image_id, turns, modalities)
    assert len(encoded.input_ids) == len(encoded.labels)
    collapsed = _collapse(encoded.input_ids, image_id, modalities)
    assert tokenizer.decode(collapsed, skip_special_tokens=False) == rendered

    # Exactly each reply and its end-of-turn token are learned, nothing else.
    replies = [t.content for t in turns if t.role == "assistant"]
    assert chat.end_of_turn is not None
    assert _learned_runs(tokenizer, encoded) == [r + chat.end_of_turn for r in replies]

    # Generation feeds what training saw: the prompt ids are a prefix.
    prompt = _encode(chat, tokenizer, image_id, turns, modalities, add_generation_prompt=True)
    assert encoded.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert len(prompt.input_ids) < len(encoded.input_ids)
    gen_text = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(_collapse(prompt.input_ids, image_id, modalities)) == gen_text

    # The same ids as apply_chat_template, except where a BPE token merged the
    # end of a generation prompt with the reply (LLaVA's "ASSISTANT: left").
    whole = _expand(tokenizer.apply_chat_template(messages)["input_ids"], image_id, modalities)
    if setting == "llava-1.5" and tokenizer_name != "byte":
        assert whole != encoded.input_ids
    else:
        assert whole == encoded.input_ids

    stop = chat.stop_token_ids
    assert tokenizer.convert_tokens_to_ids(chat.end_of_turn) in stop
    assert tokenizer.eos_token_id in stop


@pytest.mark.parametrize(
    ("tokenizer_name", "end_of_turn"),
    [
        ("llama", "<|eot_id|>"),
        ("qwen2", "<|im_end|>"),
        ("gemma3", "<end_of_turn>"),
        ("phi3", "<|end|>"),
        ("smollm2", "<|im_end|>"),
        ("byte", "</s>"),
    ],
)
def test_stop_tokens_hold_each_family_end_of_turn(tokenizer_name, end_of_turn):
    tokenizer, _ = _prepared(tokenizer_name, "auto")
    chat = chat_format(tokenizer)
    assert chat.end_of_turn == end_of_turn
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert set(chat.stop_token_ids) == {tokenizer.eos_token_id, eot}


def test_phi3_final_eos_is_written_but_not_learned():
    tokenizer, image_id = _prepared("phi3", "auto")
    chat = chat_format(tokenizer)
    encoded = _encode(chat, tokenizer, image_id, SINGLE, ["t1"])
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert encoded.labels[-1] == IGNORE_INDEX


def test_llava_format_on_the_byte_tokenizer_is_todays_format():
    assert chat_format(build_byte_tokenizer()).name == "llava-1.5"  # no template of its own
    tokenizer, image_id = _prepared("byte", "auto")
    assert tokenizer.chat_template == named_template("llava-1.5")
    chat = chat_format(tokenizer)
    encoded = _encode(chat, tokenizer, image_id, MULTI, ["t1", "fmri"])
    text = (
        "<s>USER: <image> and <image>\nWhich hemisphere holds the lesion?\n"
        "ASSISTANT: The lesion is in the right hemisphere.</s>\n"
        "USER: How old is the subject?\nASSISTANT: 63 years</s>\n"
    )
    assert tokenizer.decode(_collapse(encoded.input_ids, image_id, ["t1", "fmri"])) == text
    prompt = _encode(chat, tokenizer, image_id, SINGLE, ["t1"], add_generation_prompt=True)
    assert tokenizer.decode(_collapse(prompt.input_ids, image_id, ["t1"])).endswith(
        "lesion?\nASSISTANT: "
    )
    with_system = chat_format(tokenizer, "llava-1.5", "Answer in one word.")
    encoded = _encode(with_system, tokenizer, image_id, SINGLE, ["t1"])
    assert tokenizer.decode(_collapse(encoded.input_ids, image_id, ["t1"])).startswith(
        "<s>Answer in one word.\nUSER: "
    )


def test_prepare_tokenizer_adds_missing_tokens_once_and_stores_the_template():
    tokenizer = family_tokenizer("llama")
    before = len(tokenizer)
    assert prepare_tokenizer(tokenizer, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert len(tokenizer) == before + 2
    assert tokenizer.chat_template == named_template("chatml")
    assert prepare_tokenizer(tokenizer, "chatml") == []
    # auto keeps a tokenizer's own template (here the chatml just stored).
    assert prepare_tokenizer(tokenizer, "auto") == []
    assert tokenizer.chat_template == named_template("chatml")
    assert chat_format(tokenizer).name == "chatml"  # stored, and still known by its name


def test_the_format_travels_with_a_saved_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer, image_id = _prepared("qwen2", "gemma")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    chat = chat_format(reloaded)
    assert chat.template == named_template("gemma")
    before = _encode(chat_format(tokenizer, "gemma"), tokenizer, image_id, MULTI, ["t1", "t1"])
    after = _encode(chat, reloaded, image_id, MULTI, ["t1", "t1"])
    assert after == before


def test_a_template_file_is_used(tmp_path):
    path = tmp_path / "qa.jinja"
    path.write_text(
        "{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n"
        "{% else %}A: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    tokenizer, image_id = _prepared("smollm2", str(path))
    chat = chat_format(tokenizer, str(path))
    assert chat.name == str(path) and tokenizer.chat_template == path.read_text()
    encoded = _encode(chat, tokenizer, image_id, MULTI, ["t1", "fmri"])
    assert _learned_runs(tokenizer, encoded) == [
        " The lesion is in the right hemisphere.<|im_end|>",
        " 63 years<|im_end|>",
    ]
    prompt = _encode(chat, tokenizer, image_id, MULTI, ["t1", "fmri"], add_generation_prompt=True)
    assert encoded.input_ids[: len(prompt.input_ids)] == prompt.input_ids


def test_a_template_that_writes_history_differently_still_learns_only_replies(tmp_path):
    # Like Qwen3 without thinking: a fresh turn opens with an empty think block
    # that past turns do not have, so the generation prompt is not a prefix.
    path = tmp_path / "think.jinja"
    path.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
    )
    tokenizer, image_id = _prepared("qwen2", str(path))
    chat = chat_format(tokenizer, str(path))
    encoded = _encode(chat, tokenizer, image_id, MULTI, ["t1", "fmri"])
    assert _learned_runs(tokenizer, encoded) == [
        "The lesion is in the right hemisphere.<|im_end|>",
        "63 years<|im_end|>",
    ]


def test_bad_settings_are_config_errors_naming_the_setting():
    tokenizer = build_byte_tokenizer()
    with pytest.raises(
        ConfigError,
        match=r"model.chat_template: unknown template 'vicuna'.*"
        r"llava-1.5, chatml, llama3, gemma",
    ):
        chat_format(tokenizer, "vicuna")
    with pytest.raises(ConfigError, match="model.chat_template: no file /nowhere/t.jinja"):
        prepare_tokenizer(tokenizer, "/nowhere/t.jinja")
    with pytest.raises(ConfigError, match=r"chatml writes <\|im_start\|>, <\|im_end\|>.*lacks"):
        chat_format(tokenizer, "chatml")


def test_a_template_error_names_the_record():
    tokenizer, image_id = _prepared("gemma3", "auto")
    chat = chat_format(tokenizer)
    turns = [Turn(role="user", content="a"), Turn(role="user", content="b")]
    with pytest.raises(DataError, match="m.jsonl:4: the chat template .* alternate"):
        _encode(chat, tokenizer, image_id, turns, [], where="m.jsonl:4")


@pytest.mark.parametrize("tokenizer_name", ["byte", "gemma3"])
def test_placeholder_mismatch_and_length_are_errors(tokenizer_name):
    tokenizer, image_id = _prepared(tokenizer_name, "auto")
    chat = chat_format(tokenizer)
    with pytest.raises(TokenCountError, match="2 image"):
        _encode(chat, tokenizer, image_id, SINGLE, ["t1", "t1"])
    with pytest.raises(TokenCountError, match="more <image> placeholders than images"):
        _encode(chat, tokenizer, image_id, MULTI, ["t1"])
    with pytest.raises(DataError, match="'dmri' is not active"):
        _encode(chat, tokenizer, image_id, SINGLE, ["dmri"])
    with pytest.raises(DataError, match="x.jsonl:1: .* at most 8"):
        chat.encode(
            SINGLE,
            ["t1"],
            tokenizer=tokenizer,
            image_token_id=image_id,
            tokens_per_modality=TOKENS,
            max_length=8,
            where="x.jsonl:1",
        )


@pytest.mark.parametrize("tokenizer_name", ["byte", "gemma3"])
def test_a_huge_conversation_is_refused_before_it_is_rendered(tokenizer_name, monkeypatch):
    tokenizer, image_id = _prepared(tokenizer_name, "auto")
    chat = chat_format(tokenizer)
    # 10 MB in one turn: refused by its length in characters, never rendered or tokenised.
    huge = [Turn(role="user", content="<image>\n" + "lesion " * 1_500_000)]
    huge.append(Turn(role="assistant", content="left"))

    def render(*args, **kwargs):
        raise AssertionError("rendered")

    monkeypatch.setattr(type(chat), "_render", render)
    with pytest.raises(DataError, match=r"x.jsonl:3: the conversation is at least \d+ tokens"):
        chat.encode(
            huge,
            ["t1"],
            tokenizer=tokenizer,
            image_token_id=image_id,
            tokens_per_modality=TOKENS,
            max_length=4096,
            where="x.jsonl:3",
        )
    # A conversation that fits is not refused by the bound (it is rendered: here, refused).
    with pytest.raises(AssertionError, match="rendered"):
        _encode(chat, tokenizer, image_id, SINGLE, ["t1"])


_WORDS = st.sampled_from(
    ["left", "right", "male", "female", "63", "years", "lesion", "Which", "the", "ok", "é", "?"]
)
_TEXT = st.lists(
    st.tuples(_WORDS, st.sampled_from([" ", "  ", "\n", ", ", ""])), min_size=1, max_size=6
).map(lambda parts: "".join(w + s for w, s in parts).strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(CASES),
    exchanges=st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=3),
    images=st.lists(st.sampled_from(sorted(TOKENS)), max_size=2),
)
def test_any_conversation_learns_exactly_its_replies(case, exchanges, images):
    tokenizer, image_id = _shared(case)
    chat = chat_format(tokenizer, case[1])
    turns = []
    for i, (question, answer) in enumerate(exchanges):
        prefix = "<image>" * len(images) + "\n" if i == 0 and images else ""
        turns += [
            Turn(role="user", content=prefix + question),
            Turn(role="assistant", content=answer),
        ]
    encoded = _encode(chat, tokenizer, image_id, turns, images)
    assert _learned_runs(tokenizer, encoded) == [a + chat.end_of_turn for _, a in exchanges]
    prompt = _encode(chat, tokenizer, image_id, turns, images, add_generation_prompt=True)
    assert encoded.input_ids[: len(prompt.input_ids)] == prompt.input_ids


@functools.cache
def _shared(case):
    # Hypothesis runs many examples: prepare each tokenizer once (none is changed).
    return _prepared(*case)


@pytest.mark.parametrize(
    ("tokenizer_name", "setting"), [("smollm2", "llava-1.5"), ("llama", "auto")]
)
def test_a_tokenizer_without_offsets_is_cut_at_every_boundary(tokenizer_name, setting):
    tokenizer, image_id = _prepared(tokenizer_name, setting)
    chat = chat_format(tokenizer, setting)
    chat._backend(tokenizer).rust = None  # as a Python-only tokenizer: no offsets
    encoded = _encode(chat, tokenizer, image_id, MULTI, ["t1", "fmri"])
    assert _learned_runs(tokenizer, encoded) == [
        t.content + chat.end_of_turn for t in MULTI if t.role == "assistant"
    ]
    prompt = _encode(chat, tokenizer, image_id, MULTI, ["t1", "fmri"], add_generation_prompt=True)
    assert encoded.input_ids[: len(prompt.input_ids)] == prompt.input_ids


def test_a_chat_format_survives_pickling_for_spawned_workers():
    import pickle

    tokenizer, image_id = _prepared("gemma3", "auto")
    chat = chat_format(tokenizer, "auto", "Answer in one word.")
    copy = pickle.loads(pickle.dumps(chat))
    assert (copy.template, copy.stop_token_ids, copy.system_prompt) == (
        chat.template,
        chat.stop_token_ids,
        chat.system_prompt,
    )
    assert _encode(copy, tokenizer, image_id, MULTI, ["t1", "t1"]) == _encode(
        chat, tokenizer, image_id, MULTI, ["t1", "t1"]
    )


def test_datasets_and_encode_conversation_write_the_format_they_are_given():
    from umbrella_core.data.conversation import encode_conversation
    from umbrella_core.data.dataset import RecordDataset
    from umbrella_core.types import StudyRecord

    tokenizer, image_id = _prepared("qwen2", "auto")
    turns = [Turn(role="user", content="How old is the subject?"), *MULTI[3:]]
    record = StudyRecord(subject="sub-01", images=(), turns=turns, source="m.jsonl:1")
    chat = chat_format(tokenizer, "auto", "You are a careful radiologist.")
    dataset = RecordDataset([record], {}, Tokenization.of(tokenizer, image_id, {}, 512, chat))
    encoded = dataset.encode(record)
    assert encoded == _encode(chat, tokenizer, image_id, turns, [])
    assert "careful radiologist" in tokenizer.decode(encoded.input_ids)
    # Without a format: the tokenizer's own (here Qwen2.5's, with its default system message).
    plain = encode_conversation(
        turns,
        [],
        tokenizer=tokenizer,
        image_token_id=image_id,
        tokens_per_modality={},
        max_length=512,
    )
    assert tokenizer.decode(plain.input_ids).startswith("<|im_start|>system\nYou are Qwen")


@pytest.mark.parametrize(
    ("tokenizer_name", "family"),
    [("gemma3", "gemma"), ("qwen2", "chatml"), ("llama", "llama3"), ("byte", "llava-1.5")],
)
def test_auto_without_a_template_writes_the_family_s_turn_tokens(tokenizer_name, family):
    # A base model's tokenizer from a GGUF file ships no template; its vocabulary still
    # holds the turn tokens it was pretrained with: writing those beats plain words.
    tokenizer = _tokenizer(tokenizer_name)
    tokenizer.chat_template = None
    before = len(tokenizer)
    assert chat_format(tokenizer).name == family
    assert prepare_tokenizer(tokenizer, "auto") == []
    assert len(tokenizer) == before  # no new, untrained token
    assert tokenizer.chat_template == named_template(family)  # saved with the checkpoint


def test_an_end_of_turn_written_as_plain_text_is_no_stop_token(tmp_path):
    path = tmp_path / "hash.jinja"
    path.write_text(
        "{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n"
        "{% else %}A: {{ m.content }}###\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    tokenizer, _ = _prepared("smollm2", str(path))
    chat = chat_format(tokenizer, str(path))
    # Generation stops at token ids only: "###" spelled by the model would not end it.
    assert chat.end_of_turn is None
    assert chat.stop_token_ids == (tokenizer.eos_token_id,)
