import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlxserve.detokenizer import IncrementalDetokenizer, StopMatcher

FFFD = "\ufffd"
TEXT = "Hello 你好世界 😀 naïve café — we stop <|END|> here and then 🎉 more text"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A tiny byte-level BPE: with 320 tokens, CJK characters and emoji span several tokens."""
    corpus = [
        "Hello world! The quick brown fox jumps over the lazy dog.",
        "Streaming text arrives one token at a time, then we stop.",
        "naïve café résumé 你好 世界 😀",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def stream(tokenizer, ids, stops=()):
    """Run ids through detokenizer + stop matcher as the engine does; returns (deltas, stopped)."""
    detok = IncrementalDetokenizer(tokenizer.decode)
    matcher = StopMatcher(stops)
    deltas = []
    for i in ids:
        out, stopped = matcher.feed(detok.add(i))
        deltas.append(out)
        if stopped:
            return deltas, True
    deltas.append(matcher.feed(detok.flush())[0])
    deltas.append(matcher.flush())
    return deltas, False


def test_fixture_splits_characters_over_tokens(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    assert tokenizer.decode(ids) == TEXT
    assert sum(FFFD in tokenizer.decode([i]) for i in ids) >= 6


def test_streaming_never_emits_partial_characters(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    detok = IncrementalDetokenizer(tokenizer.decode)
    deltas = [detok.add(i) for i in ids]
    assert all(FFFD not in d for d in deltas)
    assert detok.flush() == ""
    assert "".join(deltas) == TEXT == detok.text


def test_text_is_emitted_as_soon_as_characters_complete(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    detok = IncrementalDetokenizer(tokenizer.decode)
    held = 0
    for n, i in enumerate(ids, 1):
        detok.add(i)
        full = tokenizer.decode(ids[:n])
        assert full.startswith(detok.text)
        if full.endswith(FFFD):
            held += 1
        else:
            assert detok.text == full
    assert held >= 3


def test_flush_releases_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 😀").ids
    detok = IncrementalDetokenizer(tokenizer.decode)
    emitted = "".join(detok.add(i) for i in ids[:-1])  # the emoji's last byte never arrives
    assert emitted == "ok "
    assert detok.flush() == FFFD
    assert detok.text == "ok " + FFFD


def test_prompt_tail_gives_left_context():
    # SentencePiece-style: "▁world" decodes to "world" alone but " world" after another token.
    tok = Tokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1, "!": 2}, unk_token="!"))
    tok.decoder = decoders.Metaspace()
    without = IncrementalDetokenizer(tok.decode)
    assert without.add(1) == "world"
    with_tail = IncrementalDetokenizer(tok.decode, prompt_tail=[0])
    assert [with_tail.add(i) for i in (1, 2, 1)] == [" world", "!", " world"]
    assert with_tail.text == " world! world"


def test_stop_string_spanning_tokens(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    stop = "<|END|>"
    pieces = [tokenizer.decode([i]) for i in ids]
    # precondition: the stop string is spread over several tokens
    assert not any(stop in p for p in pieces)
    deltas, stopped = stream(tokenizer, ids, [stop, "never"])
    assert stopped
    assert "".join(deltas) == TEXT[: TEXT.index(stop)]


def test_stop_string_of_multibyte_characters(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    deltas, stopped = stream(tokenizer, ids, ["世界"])
    assert stopped and "".join(deltas) == "Hello 你好"


def test_held_back_text_released_without_stop(tokenizer):
    text = "we stop <|EN"  # ends with a prefix of the stop string
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer.decode)
    matcher = StopMatcher(["<|END|>"])
    emitted = "".join(matcher.feed(detok.add(i))[0] for i in ids)
    assert emitted == "we stop "
    emitted += matcher.feed(detok.flush())[0] + matcher.flush()
    assert emitted == text


# --- StopMatcher on its own -----------------------------------------------------------------


def feed_all(stops, chunks):
    matcher = StopMatcher(stops)
    out = []
    for c in chunks:
        text, stopped = matcher.feed(c)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_overlapping_prefix():
    assert feed_all(["ab"], ["a", "a", "b", "c"]) == ("a", True)
    assert feed_all(["ab"], ["aab"]) == ("a", True)


def test_stop_inside_one_delta_with_other_text():
    assert feed_all(["STOP"], ["foo", "barSTOPbaz"]) == ("foobar", True)


def test_no_stop_passes_everything_through():
    assert feed_all([], ["a", "b"]) == ("ab", False)
    assert feed_all(["xyz"], ["abcx", "y"]) == ("abcxy", False)


def test_nothing_emitted_after_stop():
    matcher = StopMatcher(["END"])
    assert matcher.feed("aEN") == ("a", False)
    assert matcher.feed("Dtail") == ("", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_first_completed_stop_wins():
    # "b" completes before "abc" does, whatever the chunking.
    assert feed_all(["abc", "b"], ["xabc"]) == ("xa", True)
    # two stops end at the same place: the longer one is cut
    assert feed_all(["c", "bc"], ["abcd"]) == ("a", True)


def test_result_independent_of_chunking():
    stops = ["<|END|>", "||", "ENDING", "q"]
    text = "some text with |a pipe, <|EN almost, ENDIN and then ENDING <|END|> tail"
    expected = text[: text.index("ENDING")]
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 20)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert feed_all(stops, chunks) == (expected, True)


def test_the_text_held_back_is_the_longest_tail_that_may_start_a_stop_string():
    """Against a plain search over every tail, on a small alphabet (many partial matches)."""
    rng = random.Random(1)
    for _ in range(500):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        matcher = StopMatcher(stops)
        emitted, stopped = matcher.feed(text)
        if stopped:
            continue
        longest = max((n for n in range(len(text) + 1) for s in stops if n < len(s) and text.endswith(s[:n])), default=0)
        assert emitted == text[:len(text) - longest], (stops, text)


def test_empty_stop_rejected():
    with pytest.raises(ValueError):
        StopMatcher([""])
