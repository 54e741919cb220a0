"""The real SmolLM2-135M-Instruct Q4_1 GGUF (the default model) through the whole stack."""

import json
import os
import subprocess
import sys

import pytest

from mlxserve.engine import Engine
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams

FRANCE_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is"
PARIS = 7042


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(str(smollm2_path), progress=False)


def test_capital_of_france_is_paris(smollm2):
    assert smollm2.tokenizer.encode("The capital of France is") == FRANCE_IDS
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=3)
    with Engine(smollm2) as engine:
        events = engine.generate(FRANCE_IDS, params)
    tokens = [t for e in events for t in e.token_ids]
    assert tokens[0] == PARIS
    first = events[0].logprobs[0]
    assert first.token_id == PARIS and abs(first.logprob - (-0.26)) < 0.05
    assert [tid for tid, _ in first.top][:1] == [PARIS]
    text = "".join(e.text for e in events)
    assert text.startswith(" Paris.\n\nThe answer is")


def test_chat_prompt_follows_the_gguf_template(smollm2):
    tok = smollm2.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids[0] == 1  # <|im_start|> is one special token
    assert tok.decode(ids) == rendered
    assert 2 in tok.eos_token_ids  # <|im_end|> ends a chat turn


def test_default_model_cli_run(smollm2_path):
    """`mlxserve run` with no --model uses the default alias (already pulled by the fixture)."""
    r = subprocess.run(
        [sys.executable, "-m", "mlxserve", "run", "The capital of France is", "--no-chat", "--json",
         "--temperature", "0", "--max-tokens", "3"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"][0] == PARIS
    assert out["text"].startswith(" Paris")


def test_server_scores_a_text_like_a_direct_forward_pass(smollm2):
    """/v1/completions echo + logprobs on the real model equals a direct forward pass."""
    import openai

    from live_server import LiveServer
    from mlxserve.server import create_app
    from tiny_models import reference_prompt_logprobs

    with Engine(smollm2) as engine:
        live = LiveServer(create_app(engine, "smollm2"))
        try:
            client = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
            r = client.completions.create(model="smollm2", prompt="The capital of France is Paris",
                                          echo=True, logprobs=1, max_tokens=0)
        finally:
            live.stop()
    prompt = FRANCE_IDS + [PARIS]
    expected = reference_prompt_logprobs(smollm2, prompt)
    got = r.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(prompt)
    assert all(abs(lp - expected[i, prompt[i + 1]].item()) < 1e-4 for i, lp in enumerate(got[1:]))
    assert abs(got[-1] - (-0.26)) < 0.05  # " Paris" after "The capital of France is"
