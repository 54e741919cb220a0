"""Embeddings (Request.embed, the server's /v1/embeddings): the model's final hidden state at a
prompt's last position, against mlx-lm's model on the same weights, and unchanged by batching,
chunked prefill and the prefix cache."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlxserve.engine import Engine, EngineConfig
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request

TEXTS = ["The capital of France is Paris, and it is a large city on a river.",
         "Once upon a time there was a tiny model.",
         "The capital of France is Paris, and it is a large city on a river. It has many museums."]


def reference_hidden(folder, ids) -> np.ndarray:
    """mlx-lm's final hidden states (after the last norm), [T, hidden]."""
    model, _ = mlx_lm_load_model(folder)
    text_model = model.language_model.model if hasattr(model, "language_model") else model.model
    return np.array(text_model(mx.array(ids)[None])[0])


def embed_all(loaded, prompts, generate=None, **config):
    """Each prompt's embedding event, all submitted at once (with `generate`, a greedy answer
    to that prompt beside them, returned too)."""
    with Engine(loaded, EngineConfig(**config)) as engine:
        answer = engine.submit(Request(generate, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))) \
            if generate else None
        streams = [engine.submit(Request(p, embed=True)) for p in prompts]
        finals = [list(stream)[-1] for stream in streams]
        tokens = [t for e in answer for t in e.token_ids] if answer else None
    return finals, tokens


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5"])
def test_an_embedding_is_the_last_positions_final_hidden_state(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    loaded = load_model(str(folder), progress=False)
    ids = loaded.tokenizer.encode(TEXTS[0])
    (final,), _ = embed_all(loaded, [ids])
    assert final.finish_reason == "stop" and final.completion_tokens == 0 and final.token_ids == []
    assert final.prompt_tokens == len(ids)
    np.testing.assert_allclose(final.embedding, reference_hidden(folder, ids)[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5"])
def test_batching_chunks_and_the_prefix_cache_change_no_embedding(tiny_model_dir, arch):
    loaded = load_model(str(tiny_model_dir(arch)), progress=False)
    prompts = [loaded.tokenizer.encode(t) for t in TEXTS]
    alone = [embed_all(loaded, [p], prefix_cache=False)[0][0].embedding for p in prompts]
    answer_alone = embed_all(loaded, [], generate=prompts[1], prefix_cache=False)[1]
    # Chunks of 8 tokens, blocks of 8, the first prompt twice (the second time from the cache;
    # the third prompt starts with the first), beside a row that generates.
    finals, answer = embed_all(loaded, prompts + prompts[:1], generate=prompts[1], max_batch_tokens=8, block_size=8)
    for final, expected in zip(finals, alone + alone[:1]):
        np.testing.assert_allclose(final.embedding, expected, atol=1e-5, rtol=0)
    assert answer == answer_alone
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        first = list(engine.submit(Request(prompts[0], embed=True)))[-1]
        again = list(engine.submit(Request(prompts[0], embed=True)))[-1]
        longer = list(engine.submit(Request(prompts[2], embed=True)))[-1]
    assert first.cached_tokens == 0 and again.cached_tokens > 0 and longer.cached_tokens > 0
    np.testing.assert_allclose(again.embedding, alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(longer.embedding, alone[2], atol=1e-5, rtol=0)


def test_a_text_to_embed_gets_what_its_tokenizer_appends(tiny_model_dir, tmp_path):
    """Qwen3-Embedding's tokenizer.json appends <|endoftext|> (its post-processor), and its
    embedding is that token's hidden state; a GGUF says so with add_eos_token. Embedding inputs
    get it, prompts to answer do not, token ids are taken as given."""
    import json
    import shutil

    from mlxserve.openai_api import parse_embeddings
    from mlxserve.tokenizer import Tokenizer
    from tiny_models import gguf_tokenizer_metadata, tiny_tokenizer_json

    folder = tmp_path / "embedding-model"
    shutil.copytree(tiny_model_dir("qwen3"), folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    end = next(a["id"] for a in spec["added_tokens"] if a["content"] == "<|endoftext|>")
    text, special = {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [text, special], "pair": [text, special],
                              "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [end],
                                                                   "tokens": ["<|endoftext|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    plain = Tokenizer.from_folder(tiny_model_dir("qwen3"))
    tokenizer = Tokenizer.from_folder(folder)
    assert plain.appended_ids == () and tokenizer.appended_ids == (end,)
    ids = plain.encode("Paris is a city")
    assert tokenizer.encode("Paris is a city") == ids  # a prompt to answer
    assert parse_embeddings({"input": ["Paris is a city"]}, tokenizer, 2048, "m", 64, 10).inputs == [ids + [end]]
    assert parse_embeddings({"input": [[5, 6]]}, tokenizer, 2048, "m", 64, 10).inputs == [[5, 6]]

    metadata = gguf_tokenizer_metadata(tiny_tokenizer_json())
    assert Tokenizer.from_gguf_metadata(metadata).appended_ids == ()
    metadata["tokenizer.ggml.add_eos_token"] = True
    assert Tokenizer.from_gguf_metadata(metadata).appended_ids == (2,)  # its eos_token_id


def test_a_hidden_state_that_is_not_finite_is_an_error_in_either_format():
    from mlxserve.openai_api import APIError, Embeddings, embedding_json

    for base64 in (False, True):
        request = Embeddings([[1]], "m", base64, None)
        assert len(embedding_json([3.0, 4.0], request, 0)) > 0
        with pytest.raises(APIError) as caught:
            embedding_json([float("nan"), 1.0], request, 3)
        assert caught.value.status == 500 and "input 3" in caught.value.message
