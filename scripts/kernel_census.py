"""The GPU kernels one steady decode step launches, counted by name, on random weights at a
real shape. MLX's CUDA back-end (with CUDA graphs on, which this script turns on for itself)
can write each graph it builds to a dot file; one step's files are read back and their kernel
nodes counted. A step bound by the host costs about what its kernel count costs (README,
"Measured"), so this is the inventory to shrink.

    PYTHONPATH=src python3 scripts/kernel_census.py qwen3-0.6b [--streams 1,32]
        [--prefill-tokens P [--chunk-at K]] [--chat-history H]

With --chat-history, the step counted is instead a chat's second turn (alone, prefix cache
on): a first turn answers H random tokens with 128, then history + answer + 32 new tokens
come back, and the step that prefills the uncached rest is counted (the bench's
--chat-history-tokens scenario).

With --prefill-tokens, a request of P random tokens joins the decoding rows and the step
counted is its third chunk's (a step that prefills beside them, as while a long prompt is
admitted; P should exceed three step budgets, 3 x 512 by default), or with --chunk-at K the
first chunk's that starts K or more tokens into the prompt (a deep chunk: past 2,048 keys,
chunks of up to 128 tokens attend through cache.chunk_attention).

CUDA only (other back-ends write no graphs).
"""

import argparse
import collections
import glob
import os
import re
import tempfile
from dataclasses import replace

DUMP = os.path.join(tempfile.mkdtemp(prefix="mlxserve-census-"), "graph")
# Before MLX starts: mlxserve turns CUDA graphs off unless they are set.
os.environ["MLX_USE_CUDA_GRAPHS"] = "1"
os.environ["MLX_SAVE_CUDA_GRAPHS_DOT_FILE"] = DUMP

import mlx.core as mx  # noqa: E402

from mlxserve.engine import EngineConfig, make_scheduler  # noqa: E402
from mlxserve.random_weights import build_random_model  # noqa: E402
from mlxserve.sampling import SamplingParams  # noqa: E402
from mlxserve.scheduler import Request  # noqa: E402
from steady_decode import decoding_scheduler  # noqa: E402


def kernel_name(label: str) -> str:
    """A readable name for a dot node's label: MLX's own kernels demangled down to their
    name (mlx::core::cu::<name>), others (cuBLAS, cuDNN) as they are, cut short."""
    match = re.match(r"_ZN3mlx4core2cu(\d+)(\w+)", label)
    if match:
        return match.group(2)[: int(match.group(1))][:60]
    return label[:60]


def kernel_sequence(files: list[str]) -> list[str]:
    """The step's kernels in the order the graphs hold them."""
    names = []
    for path in files:
        text = open(path).read()
        # A node: "graph_A_node_B"[... label="<number>\n<kernel or child graph name>\n"]
        for name in re.findall(r'_node_\d+"\[[^\]]*?label="\d+\n([^\n"]+)', text):
            if not name.startswith("graph_"):  # a child graph's node, not a kernel
                names.append(kernel_name(name))
    return names


def _graph_number(path: str) -> tuple:
    """Graph files in the order MLX wrote them (their numbers, not their names, sort)."""
    digits = re.findall(r"\d+", os.path.basename(path))
    return tuple(int(d) for d in digits)


def chat_second_turn(loaded, history_tokens: int):
    """A scheduler about to run a chat's second turn: its first turn ran (twice, so that
    every shape is built before the counted step), and the second is queued."""
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    vocab = loaded.config["vocab_size"]
    for attempt in range(2):
        scheduler = make_scheduler(loaded, EngineConfig(prefix_cache=True))
        scheduler.warm_up()
        history = mx.random.randint(0, vocab, (history_tokens,)).tolist()
        scheduler.add(Request(history, params))
        answer = []
        while scheduler.has_work():
            answer += [t for event in scheduler.step() for t in event.token_ids]
        follow_up = mx.random.randint(0, vocab, (32,)).tolist()
        scheduler.add(Request(history + answer + follow_up, replace(params, max_tokens=2)))
        if attempt == 0:
            while scheduler.has_work():
                scheduler.step()
    return scheduler, f"chat's second turn ({history_tokens} + 128 + 32 tokens, prefix cache on)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a random-weights shape, e.g. qwen3-0.6b or qwen3.5-0.8b")
    parser.add_argument("--streams", default="1,32", help="comma-separated numbers of decoding rows")
    parser.add_argument("--prefill-tokens", type=int, help="count a step that also prefills a chunk of a prompt this long")
    parser.add_argument("--chunk-at", type=int, default=0,
                        help="with --prefill-tokens: count the first step whose chunk starts at or past this many "
                             "of the prompt's tokens (default: the third chunk's)")
    parser.add_argument("--chat-history", type=int, help="count a chat's second turn after this many tokens of history instead")
    parser.add_argument("--sequence", metavar="FILE", help="also write each step's kernels in launch order to FILE.<streams>")
    args = parser.parse_args()
    loaded = build_random_model(args.shape)
    # A chat's turn runs alone: one count, filed under 0 streams.
    for streams in [0] if args.chat_history else [int(s) for s in args.streams.split(",")]:
        if args.chat_history:
            scheduler, what = chat_second_turn(loaded, args.chat_history)
        else:
            scheduler = decoding_scheduler(loaded, streams, max_tokens=400, warm_steps=5)
            what = "decode step"
        if args.prefill_tokens and not args.chat_history:
            prompt = mx.random.randint(0, loaded.config["vocab_size"], (args.prefill_tokens,)).tolist()
            scheduler.add(Request(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)))
            scheduler.step()  # admission and the first chunk
            scheduler.step()  # the second
            prefilling = [row for row in scheduler.running if not row.is_decoding]
            while prefilling and prefilling[0].unfed and prefilling[0].cache.length < args.chunk_at:
                scheduler.step()
                prefilling = [row for row in scheduler.running if not row.is_decoding]
            if not prefilling or prefilling[0].unfed == 0:
                raise SystemExit("kernel_census: the prompt was prefilled before the step to count; "
                                 "give a longer --prefill-tokens")
            what = f"step with a chunk at {prefilling[0].cache.length} of {args.prefill_tokens} prompt tokens"
        mx.synchronize()
        before = set(glob.glob(DUMP + "_*.dot"))
        scheduler.step()
        mx.synchronize()
        files = sorted(set(glob.glob(DUMP + "_*.dot")) - before, key=_graph_number)
        if not files:
            raise SystemExit("kernel_census: MLX wrote no CUDA graphs (it needs MLX's CUDA back-end)")
        sequence = kernel_sequence(files)
        counts = collections.Counter(sequence)
        if args.sequence:
            with open(f"{args.sequence}.{streams}", "w") as out:
                out.write("\n".join(sequence) + "\n")
        layers = len(loaded.model.layers)
        print(f"{args.shape}, {streams} streams: {sum(counts.values())} kernels in one {what} "
              f"({sum(counts.values()) / layers:.1f} per layer, {layers} layers)")
        for name, n in counts.most_common():
            print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
