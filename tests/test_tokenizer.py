"""Tokenizer and chat templates, checked against independent references.

References: transformers' own GGUF tokenizer conversion (`convert_gguf_tokenizer`, fed the same
metadata; its file reader needs torch, so we read the file with the gguf package) and transformers'
own chat template renderer (`render_jinja_template`). Ids quoted literally come from llama.cpp
(llama-cpp-python 0.3.36, vocab_only), which also agreed with us on every CORPUS string for both
files when this was written.
"""

import json
import logging
from datetime import datetime

import pytest
import tokenizers
from tokenizers import Regex, pre_tokenizers, processors

from mlxserve.chat_template import TemplateError, render_chat_template
from mlxserve.quant.gguf_metadata import read_gguf_metadata
from mlxserve.tokenizer import SUPPORTED_GGUF_PRE_TOKENIZERS, Tokenizer, TokenizerError

CORPUS = [
    "The capital of France is",
    "Hello, world!",
    "",
    "a",
    " leading space",
    "trailing spaces   ",
    "  multiple   spaces",
    "    indented with four spaces",
    "\n\n\nnewlines\n",
    "line one\r\nline two\r\n",
    "def f(x):\n    return x * 2\n\n\nclass A:\n        pass\n",
    "\tif (a) {\n\t\tb();\n\t}\n",
    "mixed\ttabs\t\tand  spaces \t\n",
    "numbers 12345 and 3.14159 and 1,000,000 and -42",
    "2024-01-15T10:30:00Z v1.2.3",
    "x = [1, 2, 3]  # comment",
    "import numpy as np\nnp.array([[1.5, -2e-3]])",
    "SELECT * FROM users WHERE id = 42;",
    "```python\nprint('hi')\n```",
    "https://example.com/path?query=1&b=2#frag email@example.com",
    "I'm sure you'll see they've done it, didn't they? I'D SAY SO",
    "emoji 🚀🔥👍🏽 done 😀😀😀😀😀",
    "中文分词测试，你好世界。",
    "日本語のテキストです、カタカナ",
    "한국어 문장입니다",
    "Café déjà vu, naïve façade, Ünïcödé ßtraße",
    "Привет, мир! مرحبا بالعالم",
    "$100 & 50% off — “quotes” ‘single’ …",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ ½ ² Ⅻ ٣",
    "zero\u200bwidth\u00a0nbsp",
    "!!!???...,,,",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "literal <|im_end|> in the middle<|im_start|>and<|endoftext|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<think>\nreasoning\n</think>\n\nanswer",
]


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path):
    return read_gguf_metadata(smollm2_path)


@pytest.fixture(scope="module")
def qwen_metadata(qwen_coder_path):
    return read_gguf_metadata(qwen_coder_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata):
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def qwen(qwen_metadata):
    return Tokenizer.from_gguf_metadata(qwen_metadata)


def _transformers_reference(metadata: dict):
    """transformers' tokenizer for this GGUF metadata, as `get_gguf_tokenizer` would build it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    tokenizer_dict = {name: metadata[f"tokenizer.{key}"]
                      for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                      if f"tokenizer.{key}" in metadata}
    backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    if metadata["tokenizer.ggml.pre"] == "smollm":
        # transformers knows no "smollm" and keeps GPT-2's split, which differs on numbers after
        # a space (" ½"). SmolLM2's own tokenizer.json, like llama.cpp, first isolates every digit:
        # that pre-tokenizer, from the tokenizers library's own parts, is the reference here.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


def _byte_vocab_metadata(pre: str | None, extra_tokens=(), merges=(), **more) -> dict:
    """GGUF metadata for a tiny byte-level BPE vocabulary: the 256 byte symbols plus extras."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + list(extra_tokens)
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [1] * len(tokens),
                "tokenizer.ggml.merges": list(merges), **more}
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    return metadata


# --- real GGUF tokenizers ---------------------------------------------------------------------

def test_smollm2_known_ids_and_round_trip(smollm2):
    assert smollm2.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    # From llama.cpp on this vocabulary: digits are split one by one ("smollm").
    assert smollm2.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smollm2.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    assert smollm2.encode(" ½ x½") == [216, 16738, 1792, 16738]  # ½ is a digit too
    for text in CORPUS:
        assert smollm2.decode(smollm2.encode(text)) == text


def test_text_with_surrogates_encodes_them_as_the_replacement_character(smollm2):
    """Bytes that are not UTF-8 on stdin or in argv reach Python as surrogates ("\\udcff"),
    which the tokenizer library refuses: they encode as U+FFFD, as a decoder replaces them."""
    assert smollm2.encode("caf\udce9 \ud800!") == smollm2.encode("caf\ufffd \ufffd!")


@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_ids_match_transformers_gguf_conversion(which, request):
    metadata = request.getfixturevalue(f"{which}_metadata")
    ours = request.getfixturevalue(which)
    reference = _transformers_reference(metadata)
    for text in CORPUS:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text


def test_special_ids_of_real_files(smollm2, qwen):
    # SmolLM2: eos <|im_end|> (2), and <|endoftext|> (0) ends a turn too. BOS is <|im_start|> but
    # the file says not to add it.
    assert smollm2.eos_token_ids == {2, 0}
    assert smollm2.bos_token_id == 1
    assert smollm2.encode("Hi")[0] != 1
    assert smollm2.vocab_size == 49152
    assert len(smollm2.special_token_ids) == 17
    assert qwen.eos_token_ids == {151645, 151643}
    assert qwen.vocab_size == 151936
    # <tool_call> is user-defined: matched whole, but not special, so decoding keeps it.
    assert qwen.encode("<tool_call>") == [151657]
    assert 151657 not in qwen.special_token_ids
    ids = qwen.encode("<|im_start|>user\n<tool_call>x<|im_end|>")
    assert qwen.decode(ids, skip_special_tokens=True) == "user\n<tool_call>x"
    assert qwen.token_to_str(qwen.encode(" capital")[0]) == "Ġcapital"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        qwen.token_to_str(10**7)


# --- pre-tokenizers by name -------------------------------------------------------------------

def test_every_supported_pre_tokenizer_builds_and_is_lossless():
    for pre in sorted(SUPPORTED_GGUF_PRE_TOKENIZERS):
        tokenizer = Tokenizer.from_gguf_metadata(_byte_vocab_metadata(pre))
        for text in CORPUS:
            assert tokenizer.decode(tokenizer.encode(text)) == text, (pre, text)


def test_pre_tokenizer_splits_match_transformers_table():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    shared = SUPPORTED_GGUF_PRE_TOKENIZERS & set(GGUF_PRE_TOKENIZER_SPLITS)
    assert {"llama-bpe", "qwen2", "qwen35", "gpt-4o", "tekken"} <= shared
    for pre in shared:
        ours = Tokenizer.from_gguf_metadata(_byte_vocab_metadata(pre)).backend.pre_tokenizer
        theirs = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        for text in CORPUS:
            assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), (pre, text)


def test_llama3_family_ignores_merges_and_adds_bos():
    # A word that is itself in the vocabulary is one token for Llama 3 even without merges
    # (ignore_merges); Qwen2 runs BPE and, with no merges, gets single bytes.
    metadata = _byte_vocab_metadata("llama-bpe", extra_tokens=["hello", "<|begin_of_text|>"],
                                    **{"tokenizer.ggml.bos_token_id": 257})
    metadata["tokenizer.ggml.token_type"][257] = 3
    llama3 = Tokenizer.from_gguf_metadata(metadata)
    qwen2 = Tokenizer.from_gguf_metadata(_byte_vocab_metadata("qwen2", extra_tokens=["hello"]))
    assert llama3.encode("hello", add_special_tokens=False) == [256]
    assert len(qwen2.encode("hello")) == 5
    # llama.cpp's default for this family is to add BOS when the file does not say; once only.
    assert llama3.encode("hello") == [257, 256]
    assert llama3.encode("hello", add_special_tokens=False) == [256]


def test_bos_follows_add_bos_token_and_is_never_doubled():
    metadata = _byte_vocab_metadata("qwen2", extra_tokens=["<s>"],
                                    **{"tokenizer.ggml.bos_token_id": 256,
                                       "tokenizer.ggml.add_bos_token": True})
    metadata["tokenizer.ggml.token_type"][256] = 3
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert tokenizer.encode("a") == [256, tokenizer.encode("a", add_special_tokens=False)[0]]
    assert tokenizer.encode("<s>a") == tokenizer.encode("a")


def test_unused_tokens_decode_to_nothing():
    """llama.cpp prints nothing for tokens of type UNUSED (5), e.g. the "[PAD31]" a converter
    pads the vocabulary with: a model that samples one adds no text, streamed or not."""
    from mlxserve.detokenizer import IncrementalDetokenizer

    metadata = _byte_vocab_metadata("qwen2", extra_tokens=["[PAD0]", "[PAD1]"])
    metadata["tokenizer.ggml.token_type"][256:258] = [5, 5]
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    hi = tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.decode([256]) == tokenizer.decode([257, 256]) == ""
    assert tokenizer.decode([hi[0], 256, *hi[1:], 257]) == "hi"
    assert tokenizer.decode([256], skip_special_tokens=True) == ""
    assert tokenizer.encode("[PAD0]", add_special_tokens=False) != [256]  # text, not the token
    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    streamed = [detokenizer.add(i) for i in [hi[0], 256, 257, *hi[1:], 256]]
    assert "".join(streamed) + detokenizer.flush() == "hi"


def test_unknown_or_missing_pre_tokenizer(caplog):
    with pytest.raises(TokenizerError, match="'no-such-pre' is not supported"):
        Tokenizer.from_gguf_metadata(_byte_vocab_metadata("no-such-pre"))
    with caplog.at_level(logging.WARNING, logger="mlxserve.tokenizer"):
        tokenizer = Tokenizer.from_gguf_metadata(_byte_vocab_metadata(None))
    assert "tokenizer.ggml.pre" in caplog.text
    assert tokenizer.decode(tokenizer.encode("still works")) == "still works"


def test_unsupported_gguf_tokenizer_models_are_refused_clearly():
    with pytest.raises(TokenizerError, match="SentencePiece.*not supported yet"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": []})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model is missing"):
        Tokenizer.from_gguf_metadata({})


# --- chat templates ---------------------------------------------------------------------------

def test_smollm2_chat_template_renders_chatml(smollm2):
    system_and_user = [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"}]
    assert smollm2.apply_chat_template(system_and_user) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert smollm2.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert smollm2.apply_chat_template([{"role": "user", "content": "Hi"}],
                                       add_generation_prompt=False).endswith("Hi<|im_end|>\n")


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo actuelle d'une ville",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}

TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "{\"sky\": \"clear\"}"},
]


def test_qwen_template_with_tools_and_tool_history(qwen):
    text = qwen.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    # The tool's JSON as transformers' tojson writes it (no ASCII escaping).
    assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n') in text
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n"
            "<tool_response>\n{\"sky\": \"clear\"}\n</tool_response><|im_end|>\n") in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_templates_render_like_transformers(which, request):
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer = request.getfixturevalue(which)
    conversations = [
        ([{"role": "user", "content": "Hi"}], None),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
          {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}], None),
    ]
    if which == "qwen":
        conversations.append((TOOL_CONVERSATION, [WEATHER_TOOL]))
    for messages, tools in conversations:
        for add_generation_prompt in (True, False):
            (expected,), _ = render_jinja_template(
                [messages], tools=tools, chat_template=tokenizer.chat_template,
                add_generation_prompt=add_generation_prompt)
            assert tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt) == expected


def test_template_variables_and_helpers():
    thinking = ("{% if enable_thinking is defined and not enable_thinking %}off{% else %}on"
                "{% endif %}|{{ bos_token }}")
    assert render_chat_template(thinking, [], enable_thinking=False, bos_token="<s>") == "off|<s>"
    assert render_chat_template(thinking, [], bos_token="<s>") == "on|<s>"
    assert render_chat_template("{{ x | tojson(indent=2, sort_keys=True) }}", [],
                                x={"b": "é<", "a": 1}) == '{\n  "a": 1,\n  "b": "é<"\n}'
    assert render_chat_template("{{ strftime_now('%Y') }}", []) == str(datetime.now().year)
    assert render_chat_template("{% generation %}kept{% endgeneration %}", []) == "kept"
    assert render_chat_template(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
        "{% endfor %}", [{"content": "1"}, {"content": "2"}]) == "1"
    # Reasoning under any common name reaches templates as `reasoning_content`.
    assert render_chat_template("{{ messages[0].reasoning_content }}",
                                [{"role": "assistant", "thinking": "hmm"}]) == "hmm"


def test_template_errors():
    with pytest.raises(TemplateError, match="^the chat template refused the conversation: Only user and assistant roles$"):
        render_chat_template("{{ raise_exception('Only user and assistant roles') }}", [])
    with pytest.raises(TemplateError, match="does not compile"):
        render_chat_template("{% if %}", [])
    with pytest.raises(TemplateError, match="chat template failed"):
        render_chat_template("{{ messages[0].content + '!' }}", [{"role": "user", "content": None}])
    with pytest.raises(TemplateError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(TemplateError, match="chat template failed"):
        render_chat_template("{{ messages.append(1) }}", [])  # the sandbox is immutable


def test_a_special_token_the_model_lacks_renders_as_nothing():
    """A GGUF without a BOS (or EOS) id: a template's `{{ bos_token }}` writes nothing, as in
    transformers and llama.cpp; it wrote "None" into the prompt."""
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    plain = Tokenizer.from_gguf_metadata(_byte_vocab_metadata("qwen2", **{"tokenizer.chat_template": template}))
    assert plain.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    with_eos = Tokenizer.from_gguf_metadata(_byte_vocab_metadata(
        "qwen2", ["<eos>"], **{"tokenizer.chat_template": template, "tokenizer.ggml.eos_token_id": 256}))
    assert with_eos.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi<eos>"
    assert with_eos.apply_chat_template([{"role": "user", "content": "hi"}], bos_token="<s>") == "<s>hi<eos>"


def test_model_without_chat_template_refuses():
    tokenizer = Tokenizer.from_gguf_metadata(_byte_vocab_metadata("qwen2"))
    assert tokenizer.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


# --- Hugging Face folders ---------------------------------------------------------------------

def test_from_folder_matches_gguf_build(smollm2, tmp_path):
    smollm2.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": smollm2.chat_template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    folder = Tokenizer.from_folder(tmp_path)
    for text in CORPUS:
        assert folder.encode(text) == smollm2.encode(text), text
    assert folder.eos_token_ids == {2, 0, 5}
    assert folder.bos_token_id == 1 and not folder.add_bos_token
    assert folder.special_token_ids == smollm2.special_token_ids
    assert folder.chat_template == smollm2.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert folder.apply_chat_template(messages) == smollm2.apply_chat_template(messages)


def test_from_folder_template_files_and_bos_from_post_processor(smollm2, tmp_path):
    backend = tokenizers.Tokenizer.from_str(smollm2.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>",
        "chat_template": [{"name": "default", "template": "config"},
                          {"name": "tool_use", "template": "tools: {{ tools | length }}"}]}))
    folder = Tokenizer.from_folder(tmp_path)
    assert folder.add_bos_token
    assert folder.encode("Hi") == [1] + smollm2.encode("Hi")
    assert folder.chat_template == "config"
    assert folder.apply_chat_template([], tools=[WEATHER_TOOL]) == "tools: 1"

    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert Tokenizer.from_folder(tmp_path).chat_template == "json"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert Tokenizer.from_folder(tmp_path).chat_template == "jinja"


def test_from_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="no tokenizer.json in"):
        Tokenizer.from_folder(tmp_path)


# --- raw bytes of single tokens ----------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_token_bytes_rebuild_the_utf8_text(which, request):
    """Byte-level BPE: a token may hold part of a UTF-8 character (decode gives U+FFFD for it
    alone); its bytes, concatenated over the sequence, are the text's UTF-8 exactly."""
    tokenizer = request.getfixturevalue(which)
    split = 0
    for text in CORPUS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8"), text
        split += sum("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert split > 0  # the corpus has tokens that split a character
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    assert tokenizer.token_bytes(im_end) == b"<|im_end|>"  # a control token: its text


def test_token_bytes_of_sentencepiece_byte_fallback_pieces():
    """SentencePiece-style vocabularies spell a space as U+2581 and bytes without a piece of
    their own as <0xE3>-style tokens (the decoder joins those bytes into characters)."""
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "\u2581Hi": 1, "<0xE6>": 2, "<0x9D>": 3, "<0xB1>": 4, "!": 5}
    backend = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = Tokenizer(backend, bos_token_id=None, eos_token_ids=set(), add_bos_token=False,
                          chat_templates={})
    ids = [1, 2, 3, 4, 5]
    assert tokenizer.decode([0, *ids]) == "<unk> Hi東!"
    assert [tokenizer.token_bytes(i) for i in ids] == [b" Hi", b"\xe6", b"\x9d", b"\xb1", b"!"]
    assert b"".join(tokenizer.token_bytes(i) for i in ids).decode() == " Hi東!"
    assert tokenizer.decode([2]) == "\ufffd"  # what the old logprobs bytes were made of


def test_token_bytes_of_silent_tokens_is_empty():
    metadata = _byte_vocab_metadata("qwen2", extra_tokens=["[PAD0]"])
    metadata["tokenizer.ggml.token_type"][256] = 5
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert tokenizer.token_bytes(256) == b""
    assert tokenizer.token_bytes(tokenizer.encode("a", add_special_tokens=False)[0]) == b"a"
    # A model's logits may cover more ids than its vocabulary (padded rows): no text, as decode.
    assert tokenizer.token_bytes(10_000) == b"" and tokenizer.decode([10_000]) == ""
