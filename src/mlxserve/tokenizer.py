"""Text <-> token ids for one model, plus its chat template.

Two sources:

- a Hugging Face folder: `tokenizer.json` (a `tokenizers` file) and `tokenizer_config.json`, with
  `generation_config.json` and `chat_template.jinja` / `chat_template.json` when present;
- a GGUF file's metadata, which holds the vocabulary, the merges, the token types and the special
  ids under llama.cpp's key names but no pre-tokenizer: only its name (`tokenizer.ggml.pre`). We
  rebuild the byte-level BPE tokenizer with the `tokenizers` library and pick the split regexes that
  llama.cpp uses for that name, so ids match what llama.cpp (and the model's own tokenizer.json)
  produce.

Both end as the same object: a `tokenizers.Tokenizer` without post-processor (BOS is added here,
by one rule for both sources) and the facts a front end needs: BOS, the ids that end a chat turn,
the control tokens and the chat template.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from .chat_template import TemplateError, render_chat_template
from .checks import is_whole, value_kind

__all__ = ["END_OF_TURN_TOKENS", "SUPPORTED_GGUF_PRE_TOKENIZERS", "TemplateError", "Tokenizer",
           "TokenizerError", "check_token_ids"]

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A tokenizer cannot be built from what was given, or cannot do what was asked."""


# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3, GPT-style, Gemma).
# A model's configured EOS is often the end-of-document token, not the end-of-turn one, so chat
# generation would run past the turn; every one of these that the vocabulary has as a special
# token joins `eos_token_ids`.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>")

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_CONTROL = 3
_USER_DEFINED = 4
_UNUSED = 5


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers by `tokenizer.ggml.pre` name
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp pre-tokenizes one family of vocabularies.

    `splits` are applied in turn, each cutting every piece into matches and the text between
    them. `ignore_merges`: a piece that is itself in the vocabulary becomes that one token without
    running BPE (Llama 3's tokenizer.json says so too). `add_bos`: llama.cpp's default when the file
    has no `tokenizer.ggml.add_bos_token`.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 is Llama 3's split with single digits.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # CJK ideographs, hiragana, katakana
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)
_DEEPSEEK_CODER_SPLITS = (
    r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",  # CJK ideographs, U+0800.., Hangul
    r"\p{N}",
)

_GPT2 = _PreTokenizer((_GPT2_SPLIT,))
# StarCoder-style vocabularies were trained with every digit on its own, then GPT-2's split.
_STARCODER = _PreTokenizer((r"\p{N}", _GPT2_SPLIT))
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)

_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **dict.fromkeys(("default", "gpt-2", "phi-2", "mpt", "olmo", "exaone4"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _STARCODER),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"),
                    _PreTokenizer((_QWEN2_SPLIT,))),
    "qwen35": _PreTokenizer((_QWEN35_SPLIT,)),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), _PreTokenizer((_GPT4O_SPLIT,))),
    "tekken": _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    "deepseek-v3": _PreTokenizer(_DEEPSEEK_V3_SPLITS),
    "deepseek-coder": _PreTokenizer(_DEEPSEEK_CODER_SPLITS),
}

SUPPORTED_GGUF_PRE_TOKENIZERS = frozenset(_PRE_TOKENIZERS)


def _pre_tokenizer_for(name: str | None) -> _PreTokenizer:
    """The pre-tokenizer for a `tokenizer.ggml.pre` name.

    A file without the key predates it (llama.cpp then warns that quality will suffer); GPT-2's
    split is what such byte-level vocabularies were built with. An unknown name is refused: a
    wrong split still runs but quietly tokenizes text unlike training, which is worse than an error.
    """
    if name is None:
        log.warning("GGUF has no tokenizer.ggml.pre; splitting text like GPT-2, which may not "
                    "match how this model was trained")
        return _GPT2
    try:
        return _PRE_TOKENIZERS[name]
    except KeyError:
        raise TokenizerError(
            f"GGUF pre-tokenizer {name!r} is not supported; supported: "
            f"{', '.join(sorted(_PRE_TOKENIZERS))}") from None


def _byte_level_pre_tokenizer(splits: tuple[str, ...]) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

def _unicode_text(text: str) -> str:
    """`text` with each UTF-16 surrogate, which is no Unicode text (Python reads bytes that are
    not UTF-8 from stdin or argv as such), replaced by U+FFFD, as a decoder replaces bad bytes."""
    try:
        text.encode("utf-8")  # the common case, at C speed
        return text
    except UnicodeEncodeError:
        pass
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template. Wraps a `tokenizers.Tokenizer`.

    `eos_token_ids` holds every id that ends generation: the configured EOS (GGUF
    `eos_token_id`, plus `eot_token_id` / `eom_token_id` when present; a folder's
    `tokenizer_config.json` EOS and every id of `generation_config.json`'s `eos_token_id`), and
    each of END_OF_TURN_TOKENS that the vocabulary has as a special token.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_ids: set[int], add_bos_token: bool, chat_templates: dict[str, str],
                 bos_token: str | None = None, eos_token: str | None = None,
                 silent_token_ids: frozenset[int] = frozenset(), appended_ids: tuple[int, ...] = ()):
        """`silent_token_ids`: ids that decode to no text at all (a GGUF's UNUSED tokens).
        `appended_ids`: what the tokenizer's own rules put after a text (an embedding model's
        end-of-text token, e.g. Qwen3-Embedding's, whose hidden state is the embedding). Only
        embedding inputs get them (openai_api.parse_embeddings), as Hugging Face and llama.cpp
        tokenize those; a prompt to answer does not."""
        if add_bos_token and bos_token_id is None:
            raise TokenizerError("the tokenizer asks for a BOS token but defines none")
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token
        self.special_token_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items()
            if token.special)
        named_ends = (backend.token_to_id(text) for text in END_OF_TURN_TOKENS)
        self.eos_token_ids = frozenset(
            eos_token_ids | {token_id for token_id in named_ends
                             if token_id in self.special_token_ids})
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._chat_templates = chat_templates
        # The strings templates see as `bos_token` / `eos_token` (e.g. Llama 3 writes
        # `{{ bos_token }}` itself).
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._silent_token_ids = frozenset(silent_token_ids)
        self.appended_ids = tuple(appended_ids)
        self._added_text = {token_id: token.content
                            for token_id, token in backend.get_added_tokens_decoder().items()}
        self._token_bytes: dict[int, bytes] = {}
        self._piece_to_bytes = None  # made on first use (see token_bytes)

    # --- sources ---

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (`tokenizer.json` is required)."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {folder}: mlxserve needs a 'fast' Hugging Face tokenizer "
                f"(a folder with only tokenizer.model / vocab files is not supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise TokenizerError(f"cannot read {tokenizer_file}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        bos_token = _token_content(config.get("bos_token"))
        eos_token = _token_content(config.get("eos_token"))
        bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        if bos_token_id is None:
            bos_token_id = generation.get("bos_token_id")
            bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        eos_token_ids = set(_as_id_list(generation.get("eos_token_id")))
        eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        if eos_token_id is not None:
            eos_token_ids.add(eos_token_id)

        # BOS: tokenizer_config's add_bos_token when it says; otherwise whatever tokenizer.json's
        # post-processor does; what it appends is kept for embedding inputs. The post-processor
        # is then dropped so that encode() has one rule.
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos_token = config.get("add_bos_token")
        if add_bos_token is None:
            add_bos_token = bos_token_id is not None and probe[:1] == [bos_token_id]
        appended = _appended(probe, backend.encode("a", add_special_tokens=False).ids)
        backend.post_processor = None

        return cls(backend, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids,
                   add_bos_token=bool(add_bos_token),
                   chat_templates=_folder_chat_templates(folder, config),
                   bos_token=bos_token, eos_token=eos_token, appended_ids=appended)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (see `read_gguf_metadata`)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise TokenizerError("the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
        if kind == "llama":
            raise TokenizerError("SentencePiece GGUF tokenizers (tokenizer.ggml.model 'llama') "
                                 "are not supported yet; load the model from a Hugging Face "
                                 "folder instead")
        if kind != "gpt2":
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported "
                                 f"(only byte-level BPE, 'gpt2')")
        if "tokenizer.ggml.merges" not in metadata:
            raise TokenizerError("the GGUF's BPE tokenizer has no merges (tokenizer.ggml.merges)")
        pre = _pre_tokenizer_for(metadata.get("tokenizer.ggml.pre"))

        tokens: list[str] = _gguf_strings(metadata, "tokenizer.ggml.tokens")
        for key in ("bos", "eos", "eot", "eom"):  # (a BOS or EOS past the tokens indexed past them)
            setting = f"GGUF metadata tokenizer.ggml.{key}_token_id"
            value = metadata.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(value, list):  # (one id in GGUF; a list failed as "unhashable type")
                raise TokenizerError(f"{setting} must be one token id, got a list")
            check_token_ids(setting, value, len(tokens))
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        # Normal tokens are spelled in GPT-2's byte alphabet, control and user-defined ones as the
        # raw text they match; the vocabulary keeps both spellings as they are.
        vocab = {token: token_id for token_id, token in enumerate(tokens)}
        merges = [tuple(merge.split(" ", 1)) for merge in _gguf_strings(metadata, "tokenizer.ggml.merges")]
        try:
            bpe = models.BPE(vocab, merges, ignore_merges=pre.ignore_merges)
        except Exception as exc:  # (the tokenizers library raises a bare Exception: a traceback)
            raise TokenizerError(_merge_problem(merges, vocab) or f"the GGUF's BPE tokenizer: {exc}") from None
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre.splits)
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>) and user-defined ones (<tool_call>) are matched whole in
        # the text before any splitting, as llama.cpp does; only control tokens count as special
        # (skipped by decode(skip_special_tokens=True)).
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                    for token, type_ in zip(tokens, types) if type_ == _CONTROL])
        backend.add_tokens([AddedToken(token, special=False, normalized=False)
                            for token, type_ in zip(tokens, types) if type_ == _USER_DEFINED])

        bos_token_id = metadata.get("tokenizer.ggml.bos_token_id")
        eos_token_id = metadata.get("tokenizer.ggml.eos_token_id")
        eos_token_ids = {metadata[key] for key in ("tokenizer.ggml.eos_token_id",
                                                   "tokenizer.ggml.eot_token_id",
                                                   "tokenizer.ggml.eom_token_id")
                         if key in metadata}
        # llama.cpp stores named templates as `tokenizer.chat_template.<name>`.
        chat_templates = {name: metadata[f"tokenizer.chat_template.{name}"]
                          for name in metadata.get("tokenizer.chat_templates", ())
                          if f"tokenizer.chat_template.{name}" in metadata}
        if "tokenizer.chat_template" in metadata:
            chat_templates["default"] = metadata["tokenizer.chat_template"]
        for name, template in chat_templates.items():  # (else a traceback at the first chat)
            if not isinstance(template, str):
                key = "tokenizer.chat_template" + ("" if name == "default" else f".{name}")
                raise TokenizerError(f"GGUF metadata {key} must be a string (a Jinja template), "
                                     f"got {value_kind(template)}")

        # Without the flag, the family's default applies, where the file names a BOS at all.
        add_bos_token = metadata.get("tokenizer.ggml.add_bos_token",
                                     pre.add_bos and bos_token_id is not None)
        appended = (eos_token_id,) if metadata.get("tokenizer.ggml.add_eos_token") and eos_token_id is not None else ()
        return cls(backend, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids,
                   add_bos_token=add_bos_token, appended_ids=appended,
                   chat_templates=chat_templates,
                   bos_token=tokens[bos_token_id] if bos_token_id is not None else None,
                   eos_token=tokens[eos_token_id] if eos_token_id is not None else None,
                   # UNUSED tokens (the "[PAD31]" a converter pads the vocabulary with) print
                   # nothing in llama.cpp, whatever their spelling.
                   silent_token_ids=frozenset(token_id for token_id, type_ in enumerate(types)
                                              if type_ == _UNUSED))

    # --- text <-> ids ---

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token text in it (e.g. "<|im_start|>") becomes that token.

        With `add_special_tokens`, BOS is put first if the model asks for one and the text does not
        already start with it (a rendered chat template often writes BOS itself).
        """
        # encode_batch releases the GIL while the Rust tokenizer works (encode holds it), so a
        # server tokenizing a huge prompt in a worker thread keeps its event loop running.
        ids = self._backend.encode_batch([_unicode_text(text)], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; bytes that do not form whole UTF-8 characters become U+FFFD.
        Silent ids (a GGUF's UNUSED tokens) give no text."""
        ids = list(ids)
        if self._silent_token_ids:
            ids = [i for i in ids if i not in self._silent_token_ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_str(self, id: int) -> str:
        """The vocabulary piece of one id, as the vocabulary spells it (e.g. "Ġthe")."""
        piece = self._backend.id_to_token(id)
        if piece is None:
            raise TokenizerError(f"token id {id} is outside the vocabulary ({self.vocab_size})")
        return piece

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes one token stands for, as it sits inside a longer text: concatenated over
        a sequence of ids, they are the UTF-8 of its decoded text. Unlike `decode([id])`, a token
        holding part of a UTF-8 character gives those bytes (not U+FFFD), and a SentencePiece
        token keeps its leading space. Control and added tokens give their text; silent ids none.
        """
        cached = self._token_bytes.get(id)
        if cached is not None:
            return cached
        if id in self._silent_token_ids or self._backend.id_to_token(id) is None:
            raw = b""  # silent, or an id the model has beyond the vocabulary: no text, as decode
        else:
            added = self._added_text.get(id)
            if added is not None:
                raw = added.encode("utf-8")
            else:
                if self._piece_to_bytes is None:
                    self._piece_to_bytes = _piece_decoder(self._backend)
                raw = self._piece_to_bytes(self.token_to_str(id))
                if raw is None:  # a decoder we do not model: its text is the best we have
                    raw = self.decode([id]).encode("utf-8")
        self._token_bytes[id] = raw
        return raw

    # --- chat ---

    @property
    def chat_template(self) -> str | None:
        return self._chat_templates.get("default")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list | None = None, **template_kwargs: Any) -> str:
        """The prompt text for `messages` (and `tools`, as JSON-schema dicts).

        `template_kwargs` become template variables (e.g. `enable_thinking=False`) and override
        `bos_token` / `eos_token`. Raises TokenizerError if the model has no chat template (use
        plain completion then) and TemplateError if the template fails.
        """
        # A model with several named templates may keep a separate one for tool use.
        name = "tool_use" if tools and "tool_use" in self._chat_templates else "default"
        template = self._chat_templates.get(name)
        if template is None:
            raise TokenizerError("this model has no chat template; use plain text completion")
        # A token the model does not have is left undefined, which renders as nothing, as in
        # transformers and llama.cpp (None rendered as the text "None").
        variables = {name: token for name, token in (("bos_token", self._bos_token), ("eos_token", self._eos_token))
                     if token is not None}
        variables.update(template_kwargs)
        return render_chat_template(template, messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt, **variables)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (no post-processor; BOS is handled by encode())."""
        return self._backend


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each printable stand-in character -> its byte
    (`bytes_to_unicode` of GPT-2's encoder.py, which every byte-level BPE shares)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_decoder(backend: tokenizers.Tokenizer):
    """A function from a vocabulary piece to its bytes (None where it cannot tell), after the
    tokenizer's decoder: ByteLevel (GPT-2's byte alphabet), or SentencePiece-style pieces
    (`<0xE3>` byte-fallback tokens, U+2581 for a space). Decoder steps that only act at the start
    of a whole text (Strip) do not apply to a token inside one."""
    decoder = backend.decoder
    spec = json.loads(decoder.__getstate__()) if decoder is not None else None
    steps = (spec.get("decoders") or []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:
        table = _gpt2_byte_decoder()

        def byte_level(piece: str) -> bytes | None:
            try:
                return bytes(table[ch] for ch in piece)
            except KeyError:  # not spelled in the byte alphabet
                return None

        return byte_level
    if not kinds <= {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}:
        return lambda piece: None
    replaces = []
    for step in steps:
        if step.get("type") == "Replace" and isinstance(step.get("pattern"), dict) \
                and "String" in step["pattern"]:
            replaces.append((step["pattern"]["String"], step.get("content", "")))
        elif step.get("type") == "Metaspace":
            replaces.append((step.get("replacement", "\u2581"), " "))
        elif step.get("type") == "Replace":  # a regex pattern: not modelled
            return lambda piece: None
    byte_fallback = "ByteFallback" in kinds

    def pieces(piece: str) -> bytes | None:
        if byte_fallback:
            match = _BYTE_FALLBACK_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        for old, new in replaces:
            piece = piece.replace(old, new)
        return piece.encode("utf-8")

    return pieces


# ---------------------------------------------------------------------------------------------
# Hugging Face folder helpers
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


def _token_content(token: str | dict | None) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _gguf_strings(metadata: dict[str, Any], key: str) -> list[str]:
    """The GGUF array of strings at `key`, refused in one line where missing or of another type."""
    if key not in metadata:
        raise TokenizerError(f"the GGUF's tokenizer has no {key}")
    value = metadata[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        got = value_kind(value) if not isinstance(value, list) else "a list holding " + value_kind(
            next(item for item in value if not isinstance(item, str)))
        raise TokenizerError(f"GGUF metadata {key} must be an array of strings, got {got}")
    return value


def _merge_problem(merges: list[tuple[str, ...]], vocab: dict[str, int]) -> str | None:
    """What is wrong with the first of `merges` that the tokenizers library refuses (looked
    for only once it has refused them: checking 150,000 merges in Python costs a second)."""
    for i, merge in enumerate(merges):
        where = f"GGUF metadata tokenizer.ggml.merges[{i}] {' '.join(merge)!r:.40}"
        if len(merge) != 2 or not all(merge):
            return f"{where} is not a merge (two tokens separated by a space)"
        unknown = next((piece for piece in (*merge, "".join(merge)) if piece not in vocab), None)
        if unknown is not None:
            return f"{where} makes or merges {unknown!r:.40}, which is not in tokenizer.ggml.tokens"
    return None


def check_token_ids(setting: str, value: int | list[int] | None, vocab_size: int,
                    error: type[ValueError] = TokenizerError) -> None:
    """`value` (an id, a list of ids or None) must hold ids of a vocabulary of `vocab_size`
    tokens: an end-of-sequence id past it could never end an answer, and a negative one would
    count from the end of a token list."""
    for token_id in _as_id_list(value):
        if not is_whole(token_id, 0) or token_id >= vocab_size:
            raise error(f"{setting} {token_id!r:.40} is not a token id of the model's vocabulary "
                        f"({vocab_size} tokens: ids 0 to {vocab_size - 1})")


def _folder_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """Named chat templates: chat_template.jinja, else chat_template.json, else
    tokenizer_config.json's `chat_template` (a string, or a list of {name, template})."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    return {entry["name"]: entry["template"] for entry in template}


def _appended(processed: list[int], plain: list[int]) -> tuple[int, ...]:
    """The ids a post-processor put after a text (`processed`) whose own ids are `plain`."""
    for start in range(len(processed) - len(plain) + 1):
        if processed[start : start + len(plain)] == plain:
            return tuple(processed[start + len(plain) :])
    return ()
