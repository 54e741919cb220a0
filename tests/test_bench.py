"""`mlxserve bench`: random-weight shapes, the statistics, both engines on the same workload,
the long-prompt scenario and the command line."""

import json
import math
import os
import subprocess
import sys
import types

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlxserve import bench, cli
from mlxserve.bench import (CLOSED_LOOP_FIGURES, BenchConfig, BenchResults, LONG_PROMPT_FIGURES, LongPromptTrace, MlxLmBackend, OurBackend,
                            RequestTrace, inter_token_latencies, make_prompts, percentile, summarize_closed_loop,
                            summarize_long_prompt)
from mlxserve.engine import Engine, EngineConfig
from mlxserve.random_weights import SHAPES, build_random_model, build_skeleton
from mlxserve.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return build_random_model("tiny", dtype="float32")


# ---- random weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape,billions", [("qwen3-0.6b", 0.596), ("qwen3-4b", 4.02)])
def test_shapes_have_the_published_parameter_counts(shape, billions):
    # Counted on the lazy skeleton: nothing is allocated.
    count = sum(p.size for _, p in tree_flatten(build_skeleton(SHAPES[shape]).parameters()))
    assert count / 1e9 == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3.5"])
@pytest.mark.parametrize("quantize", [None, 4])
def test_mlx_lm_runs_the_same_weights(shape, quantize):
    """Greedy ids of our engine and of mlx-lm's own model (qwen3, qwen3_5) built on our
    arrays agree: the comparison runs one set of weights."""
    from mlx_lm.generate import generate_step

    loaded = build_random_model(shape, dtype="float32", quantize=quantize, seed=3)
    before = mx.get_active_memory()
    theirs_model = bench.mlx_lm_model(loaded)
    mx.eval(theirs_model.parameters())
    # Our fused projections are shared as views, not copied: no second set of weights.
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(theirs_model.parameters()))
    assert mx.get_active_memory() - before < weight_bytes / 10
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = []
    with Engine(loaded) as engine:
        for prompt in make_prompts(3, 12, 0, loaded.config["vocab_size"], [3]):
            ours = [t for e in engine.generate(prompt, params) for t in e.token_ids]
            theirs = [t for t, _ in generate_step(mx.array(prompt), theirs_model, max_tokens=16)]
            assert ours == theirs
            outputs.append(ours)
    # Not a degenerate model that repeats one token whatever it is given.
    assert len({t for out in outputs for t in out}) >= 8


def test_random_weights_are_finite_in_bfloat16():
    loaded = build_random_model("tiny", quantize=8)
    assert loaded.quantization == "8-bit g64"
    with Engine(loaded) as engine:
        events = engine.generate(list(range(1, 40)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert sum(len(e.token_ids) for e in events) == 4
    weights = dict(tree_flatten(loaded.model.parameters()))
    assert weights["model.norm.weight"].dtype == mx.bfloat16


def _drawn_per_evaluation(monkeypatch) -> list[tuple[int, int]]:
    """Per MLX evaluation from now on: (elements of the random weights' draws, matrices
    quantized) that it computes, among the arrays it is asked to evaluate."""
    draw, quantize, evaluate = mx.random.normal, mx.quantize, mx.eval
    drawn, quantized, per_evaluation = {}, {}, []

    def normal(shape, *args, **kwargs):
        array = draw(shape, *args, **kwargs)
        if "key" in kwargs:  # (the skeleton's own lazy initial values, never evaluated, have none)
            drawn[id(array)] = array
        return array

    def quantize_matrix(*args, **kwargs):
        outputs = quantize(*args, **kwargs)  # (weight, scales, biases), computed together
        quantized[id(outputs[0])] = outputs[0]
        return outputs

    def evaluated(*args):
        arrays = [a for _, a in tree_flatten(list(args))]
        per_evaluation.append((sum(drawn.pop(id(a)).size for a in arrays if id(a) in drawn),
                               len([quantized.pop(id(a)) for a in arrays if id(a) in quantized])))
        evaluate(*args)

    monkeypatch.setattr(mx.random, "normal", normal)
    monkeypatch.setattr(mx, "quantize", quantize_matrix)
    monkeypatch.setattr(mx, "eval", evaluated)
    return per_evaluation


@pytest.mark.parametrize("quantize", [None, 4])
def test_random_weights_are_built_a_piece_per_evaluation(monkeypatch, quantize):
    """Python runs a Ctrl-C's handler only between MLX calls: built in one evaluation,
    qwen3-0.6b's weights kept a Ctrl-C waiting 4-15 s on a 2-core CPU. Each evaluation draws
    at most PIECE_ELEMENTS (the embedding comes in blocks of rows) and quantizes one matrix."""
    from mlxserve import random_weights

    monkeypatch.setattr(random_weights, "PIECE_ELEMENTS", 4096)  # "tiny"'s embedding: 512 x 64
    per_evaluation = _drawn_per_evaluation(monkeypatch)
    loaded = build_random_model("tiny", dtype="float32", quantize=quantize)
    assert max(drawn for drawn, _ in per_evaluation) <= 4096
    assert max(quantized for _, quantized in per_evaluation) == (1 if quantize else 0)
    embedding = dict(tree_flatten(loaded.model.parameters()))["model.embed_tokens.weight"]
    assert embedding.shape[0] == 512
    if not quantize:  # its 8 blocks, each drawn with a key of its own, have the spread asked for
        assert not mx.array_equal(embedding[:64], embedding[64:128]).item()
        assert mx.std(embedding).item() == pytest.approx(random_weights.EMBEDDING_SCALE, rel=0.05)


def test_a_ctrl_c_while_the_random_weights_are_built_stops_the_bench_after_one_piece(monkeypatch, capsys):
    from mlxserve import random_weights

    monkeypatch.setattr(random_weights, "PIECE_ELEMENTS", 4096)
    per_evaluation = _drawn_per_evaluation(monkeypatch)
    evaluate = mx.eval

    def ctrl_c_while_weights_are_drawn(*args):
        evaluate(*args)
        if per_evaluation[-1][0]:
            raise KeyboardInterrupt  # (Python raises one that came during the call once it returns)

    monkeypatch.setattr(mx, "eval", ctrl_c_while_weights_are_drawn)
    assert cli.main(["bench", "--random-weights", "tiny", "--concurrency", "1", "--runs", "1"]) == 130
    assert per_evaluation[-1][0] <= 4096  # what the build drew after the Ctrl-C: one piece at most
    assert "ready in" not in capsys.readouterr().err


# ---- statistics --------------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_inter_token_latencies_from_timestamps():
    deliveries = [(10.0, 1), (10.5, 1), (11.5, 2), (11.75, 1)]
    assert inter_token_latencies(deliveries) == [0.5, 0.5, 0.5, 0.25]  # 2 tokens at once: 2 half gaps
    # Only gaps that end inside (after, until].
    assert inter_token_latencies(deliveries, after=10.5, until=11.5) == [0.5, 0.5]


def test_a_request_trace_counts_the_events_of_one_step_as_one_delivery():
    """The engine's events of one step (an accepted speculative draft's tokens, one event each)
    share the step's time: one delivery, whose gap its tokens share (ITL had gaps of 0 s)."""
    trace = RequestTrace(prompt_tokens=10, submit=9.5)
    for when in (10.0, 10.5, 10.5, 10.5, 11.0):
        trace.add(when, 1)
    trace.add(11.5, 0)  # (a final event without a token)
    assert trace.deliveries == [(10.0, 1), (10.5, 3), (11.0, 1)] and trace.generated == 5
    assert inter_token_latencies(trace.deliveries) == [0.5 / 3] * 3 + [0.5]


def test_request_trace_figures():
    trace = RequestTrace(prompt_tokens=100, submit=9.5, deliveries=[(10.0, 1), (10.5, 1), (11.5, 2), (12.0, 1)])
    assert trace.generated == 5
    assert trace.ttft == 0.5
    assert trace.decode_rate == 4 / 2.0  # tokens after the first / time after the first


def test_summarize_closed_loop_on_known_timestamps():
    a = RequestTrace(10, submit=0.0, deliveries=[(1.0, 1), (2.0, 1), (3.0, 1)])
    b = RequestTrace(10, submit=1.0, deliveries=[(3.0, 1), (3.5, 1), (5.0, 1)])
    figures = summarize_closed_loop([a, b], peak_memory=123)
    assert figures["generated_tokens"] == 6
    assert figures["wall_s"] == 5.0
    assert figures["total_tok_s"] == 6 / 5.0
    assert figures["ttft_p50_s"] == 1.5  # TTFTs 1 and 2
    assert figures["itl_p50_s"] == 1.0  # gaps 1, 1, 0.5, 1.5
    assert figures["itl_p99_s"] == pytest.approx(1.5 - 0.03 * 0.5)
    assert figures["decode_tok_s"] == pytest.approx((1.0 + 1.0) / 2)  # 2 tokens / 2 s each
    assert figures["prefill_tok_s"] == pytest.approx((10 / 1 + 10 / 2) / 2)
    assert figures["peak_memory_bytes"] == 123


def test_prefill_rate_leaves_out_prefix_cache_tokens():
    # 10 prompt tokens, 6 of them from the prefix cache: 4 computed in the 2 s to the first token.
    trace = RequestTrace(10, submit=0.0, deliveries=[(2.0, 1), (3.0, 1)], cached_tokens=6)
    figures = summarize_closed_loop([trace], peak_memory=0)
    assert figures["prefill_tok_s"] == pytest.approx(4 / 2)
    assert figures["cached_tokens"] == 6


def test_summarize_long_prompt_separates_steady_and_admission_gaps():
    # Two streams tick every 10 ms; the long prompt arrives at t=1.0 and stalls them for 50 ms.
    ticks = [0.9 + 0.01 * i for i in range(11)] + [1.05, 1.06]
    streams = [RequestTrace(8, 0.0, [(t, 1) for t in ticks]) for _ in range(2)]
    long = RequestTrace(1000, submit=1.0, deliveries=[(1.05, 1)])
    figures = summarize_long_prompt(LongPromptTrace(streams, long, steady_start=0.9), peak_memory=0)
    assert figures["steady_itl_p50_s"] == pytest.approx(0.01)
    assert figures["admission_itl_max_s"] == pytest.approx(0.05)  # gap ending at 1.05 (the 1.06 one is after)
    assert figures["stall_ratio"] == pytest.approx(figures["admission_itl_p99_s"] / 0.01)
    assert figures["long_ttft_s"] == pytest.approx(0.05)


def test_medians_of_counts_are_counts_of_a_run():
    """With an even number of runs the median of 7 and 8 generated tokens was 7.5."""
    entry = {"runs": [], "median": {}}
    for generated, peak, wall in [(8, 1001, 2.0), (7, 1000, 1.0)]:
        BenchResults.add_run(entry, {"requests": 4, "generated_tokens": generated, "cached_tokens": 0,
                                     "peak_memory_bytes": peak, "wall_s": wall, "ttft_p50_s": None})
    median = entry["median"]
    assert median == {"requests": 4, "generated_tokens": 7, "cached_tokens": 0, "peak_memory_bytes": 1000,
                      "wall_s": 1.5, "ttft_p50_s": None}
    assert [type(median[k]) for k in ("requests", "generated_tokens", "peak_memory_bytes", "wall_s")] == [
        int, int, int, float]


def test_prompts_are_seeded_and_share_the_prefix():
    first = make_prompts(3, 20, 8, 500, [0, 1, 2])
    assert first == make_prompts(3, 20, 8, 500, [0, 1, 2])
    assert all(len(p) == 20 for p in first)
    assert first[0][:8] == first[1][:8] == first[2][:8]
    assert first[0][8:] != first[1][8:]
    assert make_prompts(3, 20, 8, 500, [0, 1, 3]) != first  # another run, another set


def test_engines_take_turns_run_by_run_on_the_same_prompts(monkeypatch):
    """The host's speed drifts during a bench: each run of ours is next to one of theirs, on
    the same prompts, and the medians come from those runs. Each turn begins with MLX's
    buffer cache emptied (not full of the other engine's buffers)."""
    calls = []
    cleared = []
    monkeypatch.setattr(bench.mx, "clear_cache", lambda: cleared.append(True))

    class Fake:
        last_stats: dict = {}

        def __init__(self, loaded, *config):
            pass

        def closed_loop(self, prompts, gen_tokens, concurrency, on_done):
            assert cleared.pop() and not cleared
            calls.append((self.name, "closed", concurrency, prompts))
            return [RequestTrace(len(p), 0.0, [(1.0, 1), (2.0, 1)]) for p in prompts]

        def long_prompt(self, streams, long, steady_tokens, stream_tokens):
            assert cleared.pop() and not cleared
            calls.append((self.name, "long", len(streams), [long]))
            traces = [RequestTrace(8, 0.0, [(0.1 * i, 1) for i in range(30)]) for _ in streams]
            return LongPromptTrace(traces, RequestTrace(len(long), 1.0, [(2.0, 1)]), steady_start=0.5)

    class Ours(Fake):
        name = "mlxserve"

    class Theirs(Fake):
        name = "mlx-lm"

    class Silent:
        def phase(self, description, total):
            pass

        def advance(self):
            pass

    monkeypatch.setattr(bench, "OurBackend", Ours)
    monkeypatch.setattr(bench, "MlxLmBackend", Theirs)
    monkeypatch.setattr(bench, "prompt_vocab_size", lambda loaded: 100)
    cfg = BenchConfig(prompt_tokens=4, gen_tokens=2, concurrency=(1, 2), requests=2, long_prompt_tokens=16,
                      long_prompt_streams=2, warmup=1, runs=2, compare="mlx-lm")
    results = bench.BenchResults({})
    bench.run_bench(types.SimpleNamespace(context_length=4096), cfg, results, Silent())
    order = [(name, kind, n) for name, kind, n, _ in calls]
    expected = [(engine, "closed", c) for c in (1, 2) for _ in range(3) for engine in ("mlxserve", "mlx-lm")]
    expected += [(engine, "long", 2) for _ in range(3) for engine in ("mlxserve", "mlx-lm")]
    assert order == expected
    assert all(calls[i][3] == calls[i + 1][3] for i in range(0, len(calls), 2))  # same prompts per pair
    assert calls[0][3] != calls[2][3]  # another run, other prompts
    assert len(results.entries("mlxserve")[1]["runs"]) == len(results.entries("mlx-lm")[2]["runs"]) == 2


# ---- scenarios -------------------------------------------------------------------------------
def test_long_prompt_is_admitted_while_streams_keep_decoding(tiny):
    """With a 16-token budget a 96-token prompt takes several steps, and our streams get a
    token in every one of them; mlx-lm prefills it in one 2048-token step. Both report."""
    streams = make_prompts(2, 8, 0, 512, [1])
    long = make_prompts(1, 96, 0, 512, [2])[0]
    our_trace = OurBackend(tiny, EngineConfig(max_batch_tokens=16)).long_prompt(streams, long, steady_tokens=4,
                                                                               stream_tokens=1000)
    their_trace = MlxLmBackend(tiny).long_prompt(streams, long, steady_tokens=4, stream_tokens=1000)
    admitted = our_trace.long.deliveries[0][0]
    for stream in our_trace.streams:
        during = inter_token_latencies(stream.deliveries, our_trace.long.submit, admitted)
        assert len(during) >= math.ceil(96 / (16 - 2))
    for trace in (our_trace, their_trace):
        figures = summarize_long_prompt(trace, peak_memory=0)
        assert all(figures[f.key] is not None for f in LONG_PROMPT_FIGURES)
        assert figures["steady_itl_p50_s"] > 0 and figures["admission_itl_p99_s"] > 0


def mlxserve(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mlxserve", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=timeout)


def test_bench_end_to_end_against_mlx_lm(tmp_path):
    out = tmp_path / "out.json"
    r = mlxserve("bench", "--random-weights", "tiny", "--dtype", "float32", "--concurrency", "1,2",
                 "--prompt-tokens", "16", "--gen-tokens", "8", "--runs", "1", "--warmup", "0",
                 "--compare", "mlx-lm", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for needle in ("TTFT p50", "total tok/s", "mlxserve", "mlx-lm", "speedup"):
        assert needle in r.stdout
    result = json.loads(out.read_text())
    assert result["partial"] is False
    assert result["config"]["concurrency"] == [1, 2]
    assert result["config"]["versions"]["mlx_lm"] and result["config"]["device"]["default"]
    for engine in ("mlxserve", "mlx-lm"):
        entries = result["results"][engine]["concurrency"]
        assert [e["concurrency"] for e in entries] == [1, 2]
        for entry in entries:
            assert all(entry["median"][f.key] is not None for f in CLOSED_LOOP_FIGURES), (engine, entry)
            [run] = entry["runs"]
            assert run["requests"] == entry["requests"] == bench.default_requests(entry["concurrency"])
            assert run["generated_tokens"] == run["requests"] * 8
    assert [e["engine_stats"]["max_running"] for e in result["results"]["mlxserve"]["concurrency"]] == [64, 64]
    speedups = result["speedups"]["concurrency"]
    assert [s["concurrency"] for s in speedups] == [1, 2]
    assert all(s[f.key] > 0 for s in speedups for f in CLOSED_LOOP_FIGURES)


def test_long_prompt_flags_through_the_cli(tmp_path, capsys):
    out = tmp_path / "long.json"
    status = cli.main(["bench", "--random-weights", "tiny", "--dtype", "float32", "--concurrency", "1",
                       "--requests", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1",
                       "--warmup", "0", "--long-prompt-tokens", "64", "--long-prompt-streams", "2",
                       "--max-batch-tokens", "16", "--compare", "mlx-lm", "--json", str(out)])
    assert status == 0
    assert "long prompt (64 tokens)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    for engine in ("mlxserve", "mlx-lm"):
        entry = result["results"][engine]["long_prompt"]
        assert entry["streams"] == 2 and entry["long_prompt_tokens"] == 64
        assert entry["median"]["steady_itl_p50_s"] > 0 and entry["median"]["admission_itl_p99_s"] > 0
    assert result["speedups"]["long_prompt"]["stall_ratio"] > 0


def test_chat_second_turn_reuses_the_history(tmp_path, capsys):
    out = tmp_path / f"reuse-{'with-a-long-name-' * 5}.json"
    status = cli.main(["bench", "--random-weights", "tiny", "--dtype", "float32", "--concurrency", "1",
                       "--requests", "1", "--prompt-tokens", "8", "--gen-tokens", "8", "--runs", "1",
                       "--warmup", "0", "--chat-history-tokens", "200", "--block-size", "16", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr()
    assert "chat second turn after 200 tokens" in printed.out
    assert f"bench: wrote {out}" in printed.err.splitlines()  # one line, however long (a log's)
    median = json.loads(out.read_text())["results"]["mlxserve"]["prefix_reuse"]["median"]
    # history (200) + answer (8) but its last token were computed in turn 1, and are reused
    assert median["cached_tokens"] == 200 + 8 - 1
    assert median["ttft_with_cache_s"] > 0 and median["ttft_without_cache_s"] > 0
    assert median["cache_speedup"] == pytest.approx(median["ttft_without_cache_s"] / median["ttft_with_cache_s"])


TINY = ["--random-weights", "tiny", "--dtype", "float32"]
ONE_RUN = ["--concurrency", "1", "--requests", "1", "--runs", "1", "--warmup", "0", "--long-prompt-streams", "1"]


@pytest.mark.parametrize("args,needle", [
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "1,x"], "--concurrency"),
    (["--concurrency", "1,8,1"], "each level once"),
    (["--concurrency", "1,100000000000000000000"], "--concurrency: at most 4,096 streams a level"),
    (["--requests", "70000"], "--requests must be <= 65,536"),
    (["--long-prompt-streams", "5000"], "--long-prompt-streams must be <= 4,096"),
    (["--random-weights", "nope"], "unknown random-weights shape 'nope'"),
    ([*TINY, "--quantize", "3"], "--quantize"),
    (["--quantize", "4"], "--quantize applies to --random-weights"),
    (["--concurrency", "4", "--requests", "2"], "--requests"),
    (["--runs", "0"], "--runs"),
    ([*TINY, "--prompt-tokens", "4000", "--gen-tokens", "200"], "(4,200) exceed the model's context length (4,096)"),
    ([*TINY, "--chat-history-tokens", "0"], "--chat-history-tokens"),
    # a block no sequence fills: the prefix cache reuses nothing (it ran, and measured that)
    ([*TINY, *ONE_RUN, "--prompt-tokens", "8", "--gen-tokens", "2", "--block-size", "5000"],
     "--block-size (5,000) must be at most the model's context length (4,096)"),
    # The long prompt's streams would reach the context (4,096) before it is admitted.
    ([*TINY, *ONE_RUN, "--prompt-tokens", "4000", "--gen-tokens", "96", "--long-prompt-tokens", "10"],
     "(4,096) leave the --long-prompt-tokens scenario's streams no room"),
    ([*TINY, *ONE_RUN, "--prompt-tokens", "4000", "--gen-tokens", "95", "--long-prompt-tokens", "10"],
     "by more than 1 token"),
])
def test_bad_flags_fail_with_one_line(args, needle, capsys):
    assert cli.main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlxserve: error: ") and needle in err[0], err


def test_bad_flag_exit_status_as_a_process():
    r = mlxserve("bench", "--random-weights", "tiny", "--concurrency", "0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mlxserve: error: --concurrency: expected comma-separated integers >= 1, got '0'"]


def test_bench_runs_a_hugging_face_layout_qwen3_5_folder(tiny_model_dir, capsys):
    """Its config keeps vocab_size under text_config: the prompts' ids come from the loaded
    model's own vocabulary."""
    folder = tiny_model_dir("qwen3_5")
    assert "vocab_size" not in json.loads((folder / "config.json").read_text())
    status = cli.main(["bench", "--model", str(folder), "--dtype", "float32", "--concurrency", "1",
                       "--requests", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1",
                       "--warmup", "0"])
    assert status == 0, capsys.readouterr().err
    assert "TTFT p50" in capsys.readouterr().out


@pytest.mark.parametrize("interval", [1, 4])
def test_compare_refuses_a_model_mlx_lm_builds_differently_in_one_line(tiny_model_dir, tmp_path, capsys, interval):
    """Qwen3.5 whose layer_types do not follow full_attention_interval: mlx-lm builds its
    layers from the interval (1: all full attention, where ours has linear layers; 4: linear
    where ours has full attention)."""
    import shutil

    folder = shutil.copytree(tiny_model_dir("qwen3_5"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["full_attention_interval"] = interval
    (folder / "config.json").write_text(json.dumps(config))
    status = cli.main(["bench", "--model", str(folder), "--dtype", "float32", "--concurrency", "1",
                       "--requests", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1",
                       "--warmup", "0", "--compare", "mlx-lm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("mlxserve: error: --compare mlx-lm: cannot build mlx-lm's 'qwen3_5' model: "
                              "its parameters differ from mlxserve's (language_model.model.layers."), err


# ---- an interrupted bench ------------------------------------------------------------------------
def test_a_json_file_that_cannot_be_written_after_the_run_is_status_2(tmp_path, capsys):
    """--json's file checked before the run can still fail when written after it (a full
    disk, /dev/full): the table is printed, then one line `mlxserve: error: …` and status 2,
    as for every other error (it was 1)."""
    status = cli.main(["bench", *TINY, *ONE_RUN, "--prompt-tokens", "8", "--gen-tokens", "2", "--json", "/dev/full"])
    captured = capsys.readouterr()
    assert "total tok/s" in captured.out
    assert captured.err.splitlines()[-1] == "mlxserve: error: --json /dev/full: No space left on device"
    assert status == 2


def _interrupt_after(monkeypatch, measured_calls: int) -> None:
    """Ctrl-C in the closed loop call after `measured_calls` of them (warm-up calls included)."""
    original, calls = OurBackend.closed_loop, []

    def closed_loop(self, *args):
        calls.append(args)
        if len(calls) > measured_calls:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(OurBackend, "closed_loop", closed_loop)


def _interrupted_bench(tmp_path, capsys, *flags) -> tuple[str, dict]:
    out = tmp_path / "b.json"
    status = cli.main(["bench", *TINY, "--concurrency", "1,2", "--prompt-tokens", "16", "--gen-tokens", "4",
                       "--runs", "3", "--json", str(out), *flags])
    assert status == 130
    captured = capsys.readouterr()
    assert "bench: interrupted; reporting what was measured" in captured.err
    return " ".join(captured.out.split()), json.loads(out.read_text())


def test_an_interrupted_bench_gives_the_runs_it_measured(tmp_path, capsys, monkeypatch):
    """Interrupted in run 2 of 3, the caption said "medians of 3 run(s)" over the 1 run the
    JSON held."""
    _interrupt_after(monkeypatch, 1)
    out, result = _interrupted_bench(tmp_path, capsys, "--warmup", "0")
    assert "(partial: interrupted)" in out
    assert "medians of 1 run (3 asked for);" in out, out
    assert result["partial"] is True
    assert [len(e["runs"]) for e in result["results"]["mlxserve"]["concurrency"]] == [1]  # C=2 never began


def test_rows_of_an_interrupted_bench_say_their_own_number_of_runs(tmp_path, capsys, monkeypatch):
    _interrupt_after(monkeypatch, 4)  # C=1: runs 1-3; C=2: run 1, interrupted in run 2
    out, result = _interrupted_bench(tmp_path, capsys, "--warmup", "0")
    assert "medians of each row's measured runs (column 'runs'; 3 asked for)" in out, out
    assert [len(e["runs"]) for e in result["results"]["mlxserve"]["concurrency"]] == [3, 1]
    import re

    rows = re.findall(r"│ (\d) │ (\d+) │ (\d) │ mlxserve │", out)
    assert rows == [("1", "4", "3"), ("2", "4", "1")], out


def test_a_bench_interrupted_in_its_warm_up_prints_no_empty_table(tmp_path, capsys, monkeypatch):
    """It printed an empty table captioned "medians of 3 run(s)"."""
    _interrupt_after(monkeypatch, 1)
    out, result = _interrupted_bench(tmp_path, capsys, "--warmup", "2")
    assert "(partial: interrupted): no run was measured" in out, out
    assert "TTFT p50" not in out and "medians" not in out
    assert result["partial"] is True
    assert all(not e["runs"] for e in result["results"]["mlxserve"]["concurrency"])


def test_the_json_records_the_context_length_the_engine_runs_with():
    """config.engine.context_length said 4096 (SchedulerConfig's default) while the engine
    ran with the model's context (make_scheduler gives it the loaded model's)."""
    loaded = types.SimpleNamespace(name="m", format="gguf", quantization="Q4_1", config={}, context_length=8192)
    cfg = BenchConfig()
    assert cfg.engine.context_length != 8192
    assert bench.describe_run(loaded, cfg, None)["engine"]["context_length"] == 8192


def test_a_second_ctrl_c_before_the_engine_begins_to_stop_quits_at_once(monkeypatch):
    """The bench's first Ctrl-C waits for the engine's step to report what was measured; a
    second quits at once. One that came just before stop() began to wait escaped as a
    KeyboardInterrupt to the Engine's `with` block, whose own stop() then waited for the
    step after all (a blocked step: for ever)."""
    import asyncio

    from mlxserve import engine

    quit_now = []
    monkeypatch.setattr(engine, "on_ctrl_c_while_stopping", lambda: quit_now.append(True))

    class SecondCtrlCAtStop:
        def stop(self):
            raise KeyboardInterrupt  # (it came as stop() was entered)

    ours = bench.OurBackend.__new__(bench.OurBackend)
    ours.engine = SecondCtrlCAtStop()

    async def first_ctrl_c():
        raise asyncio.CancelledError  # what asyncio.run makes of the first Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(ours._until_done(first_ctrl_c()))
    assert quit_now == [True]


def test_a_first_ctrl_c_as_a_finished_run_stops_its_engine_reports_what_was_measured(tmp_path, capsys, monkeypatch):
    """A Ctrl-C that came while the engine of a run that had ended stopped (between two runs)
    was taken for a second Ctrl-C: the bench quit at once, without its table or its JSON."""
    from mlxserve import engine

    quit_now = []
    monkeypatch.setattr(cli, "_exit_at_once", quit_now.append)  # (what a second Ctrl-C calls)
    real_wait_for, stops = engine.wait_for, []

    def ctrl_c_as_the_second_run_stops(done):
        real_wait_for(done)
        if getattr(done, "is_an_engines_end", False):  # (not the wait for its start)
            stops.append(done)
            if len(stops) == 2:
                raise KeyboardInterrupt  # (Python raises one that came during the wait once it returns)

    original_init = Engine.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._done.is_an_engines_end = True

    monkeypatch.setattr(Engine, "__init__", init)
    monkeypatch.setattr(engine, "wait_for", ctrl_c_as_the_second_run_stops)
    out = tmp_path / "b.json"
    status = cli.main(["bench", *TINY, "--concurrency", "1", "--prompt-tokens", "8", "--gen-tokens", "2",
                       "--runs", "3", "--warmup", "0", "--json", str(out)])
    assert quit_now == []
    assert status == 130
    assert "bench: interrupted; reporting what was measured" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["partial"] is True
    assert [len(e["runs"]) for e in result["results"]["mlxserve"]["concurrency"]] == [1]


def test_a_model_path_with_brackets_is_printed_as_it_is(tiny_model_dir, tmp_path, capsys):
    """The model's path and name, and --json's path, are text, not rich markup: "[red]" was
    taken for a style and dropped from the table's title, and "[/x]" was rich's MarkupError,
    a traceback once the runs were over."""
    (tmp_path / "v[red]2[").mkdir()
    model = tmp_path / "v[red]2[" / "x]"
    model.symlink_to(tiny_model_dir("qwen3", "float32"), target_is_directory=True)
    out = tmp_path / "v[red]2[" / "b.json"
    status = cli.main(["bench", "--model", str(model), "--concurrency", "1", "--requests", "1", "--prompt-tokens",
                       "8", "--gen-tokens", "2", "--runs", "1", "--warmup", "0", "--json", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert f"mlxserve bench: {model} (" in captured.out, captured.out
    assert f"bench: {model} (float32) ready" in captured.err and f"bench: wrote {out}" in captured.err, captured.err
    assert json.loads(out.read_text())["config"]["model"] == str(model)


def test_the_tables_keep_every_figure_whole_in_an_80_column_terminal():
    """In 80 columns (a terminal's usual width) rich squeezed the tables' 11 columns: both
    engines showed as "mlx…" and figures lost their digits ("3,58…"). Where a table does
    not fit, its figures go into several tables, each repeating the row names."""
    import io

    from rich.console import Console

    config = {"model": "random:tiny", "quantization": "bfloat16", "compare": "mlx-lm", "concurrency": [1, 32],
              "runs": 1, "prompt_tokens": 512, "gen_tokens": 128, "long_prompt_streams": 8,
              "long_prompt_tokens": 4096, "engine": {}}
    results = BenchResults(config)
    closed = {"ttft_p50_s": 1.2345, "ttft_p99_s": 12.345, "itl_p50_s": 0.0123, "itl_p99_s": 0.2345,
              "decode_tok_s": 12345.6, "total_tok_s": 23456.7, "prefill_tok_s": 34567.8,
              "peak_memory_bytes": 12_345_000_000}
    long = {"steady_itl_p50_s": 0.0123, "steady_itl_p99_s": 0.0234, "admission_itl_p99_s": 0.3456,
            "admission_itl_max_s": 0.4567, "stall_ratio": 28.1, "long_ttft_s": 12.345,
            "peak_memory_bytes": 12_345_000_000}
    for engine in (bench.OURS, bench.MLX_LM):
        for concurrency in (1, 32):
            results.add_run(results.new_entry(engine, "concurrency", concurrency=concurrency, requests=64), closed)
        results.add_run(results.new_entry(engine, "long_prompt", streams=8, long_prompt_tokens=4096), long)
    out = io.StringIO()
    bench.render(results, Console(file=out, width=80))
    text = out.getvalue()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for figure in (*CLOSED_LOOP_FIGURES, *LONG_PROMPT_FIGURES):
        value = closed.get(figure.key, long.get(figure.key))
        assert figure.format(value) in text, (figure.key, text)
    rows = [line for line in text.splitlines() if "mlxserve │" in line or "mlx-lm │" in line]
    assert rows and all(" mlxserve │" in row or " mlx-lm │" in row for row in rows), text
