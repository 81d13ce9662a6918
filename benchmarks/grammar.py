"""Constrained decoding's cost per token, side by side with unconstrained decoding, in one run.

1. The tiny Qwen2.5-VL (random weights, CPU): one rewrite's answer decoded greedily with and without
   the plan's schema (`plugins.qwen_vl.grammar`), the two interleaved `--repeats` times; per token:
   the median decode step of each (timed between logits, so the prompt's pass is left out), and the
   constraint's own time (the llguidance mask, applied to the logits). Unconstrained, its answers are
   garbage; under the schema they parse: whether the answer is a valid plan is printed too.
2. The mask alone at Qwen2.5's vocabulary size (151,936 logits), on a synthetic byte-level BPE of
   that size (no hub here: the real tokenizer cannot be fetched), walking a valid plan token by
   token. Its per-token cost is what a 7B decode step (about 20 ms on one H200 in bf16) would carry.

    python benchmarks/grammar.py            # both parts, about a minute on a CPU
    python benchmarks/grammar.py --quick    # a 20k vocabulary for part 2
    python benchmarks/grammar.py --full     # on a GPU (the kit's check e): the 7B's real decode step,
                                            # random bf16 weights, unconstrained beside constrained,
                                            # --tokens steps a run (a random 7B rambles for minutes)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from assistant.models import Choices  # noqa: E402
from plugins.qwen_vl import grammar, model  # noqa: E402
from plugins.qwen_vl.options import QwenVlOptions  # noqa: E402
from plugins.qwen_vl.rewriter import answer_schema, parse, request_text, system_prompt  # noqa: E402
from plugins.qwen_vl.vision import image_part  # noqa: E402

QWEN_VOCAB = 151_936
CHOICES = Choices(intents=["edit", "undo", "retry", "jump", "answer", "clarify"], turns=[1, 2, 3])
PLAN = (
    '{"intent": "edit", "instruction": "make it look like winter, with snow on the ground", '
    '"then": ["add a red scarf to the cat"], "subject": "the whole scene", '
    '"rationale": "a winter version of the same scene, then a scarf"}'
)


class Clock:
    """A logits processor that notes when each decode step reaches it, and how long `inner` takes."""

    def __init__(self, inner=None):
        self.inner, self.starts, self.seconds = inner, [], []

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        self.starts.append(start)
        if self.inner is None:
            return scores
        out = self.inner(input_ids, scores)
        self.seconds.append(time.perf_counter() - start)
        return out

    def step(self) -> float:
        """Seconds per decode step: from the first logits (the prompt's) to the last, per step between."""
        return (self.starts[-1] - self.starts[0]) / (len(self.starts) - 1)


HEADER = f"{'':>4} {'unconstrained':>14} {'constrained':>12} {'overhead':>9} {'mask':>7}  valid plan"


def side_by_side(vlm_model, tokenizer, inputs: dict, label: str, repeats: int, limit: int) -> None:
    """One answer (up to `limit` tokens) decoded greedily under the schema, then as many tokens without
    it, the two interleaved `repeats` times: the median ms per decode step of each (steps are timed
    between logits, so the prompt's pass is left out), and the constraint's own ms per token."""
    from transformers import LogitsProcessorList

    vocab = vlm_model.config.get_text_config().vocab_size
    found = vlm_model.generation_config.eos_token_id
    eos = found if isinstance(found, list) else [found]
    info = grammar.tokenizer_of(tokenizer, vocab, eos)

    def run(constrained: bool, limit: int, at_least: int = 0):
        clock = Clock(
            grammar.SchemaConstraint(info, answer_schema(CHOICES), vocab, eos) if constrained else None
        )
        with torch.inference_mode():
            out = vlm_model.generate(
                **inputs,
                max_new_tokens=limit,
                min_new_tokens=at_least,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
            )
        if vlm_model.device.type == "cuda":
            torch.cuda.synchronize()
        return out[0, inputs["input_ids"].shape[1] :], clock

    made, _ = run(True, limit)  # the answer, and a warm-up
    steps: dict[bool, list[float]] = {True: [], False: []}
    masks: list[float] = []
    for _ in range(repeats):
        for constrained in (True, False):
            out, clock = run(constrained, len(made), 0 if constrained else len(made))
            assert len(out) == len(made), "the runs decoded different lengths"
            steps[constrained].append(clock.step())
            masks += clock.seconds
    free, constrained = statistics.median(steps[False]), statistics.median(steps[True])
    try:
        parse(tokenizer.decode(made, skip_special_tokens=True))
        valid = "yes"
    except ValueError as e:
        valid = "cut short" if len(made) == limit else f"no ({str(e)[:40]})"
    print(
        f"{label:>4} {free * 1e3:>14.2f} {constrained * 1e3:>12.2f} {constrained / free - 1:>9.1%} "
        f"{statistics.median(masks) * 1e3:>7.3f}  {valid} ({len(made)} tokens)"
    )


def tiny(seeds: int, repeats: int) -> None:
    from tiny_qwen import save_tiny_qwen

    cat = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB")
    print("tiny Qwen2.5-VL, CPU: ms per decode step, unconstrained and constrained, over the same tokens")
    print(HEADER.replace("    ", "seed", 1))
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as folder:
            options = QwenVlOptions(
                vlm=str(save_tiny_qwen(Path(folder), seed=seed)),
                vlm_device="cpu",
                min_pixels=784,
                max_pixels=3136,
            )
            vlm = model.load(options)
            conversation = [
                {"role": "system", "content": system_prompt()},
                {
                    "role": "user",
                    "content": [
                        image_part(cat, 784, 3136),
                        {"type": "text", "text": request_text("add snow", [])},
                    ],
                },
            ]
            side_by_side(
                vlm.model, vlm.processor.tokenizer, dict(vlm.inputs([conversation])), str(seed), repeats, 4096
            )


def full(layers: int, hidden: int, repeats: int, tokens: int) -> None:
    """Qwen2.5-VL-7B's language model shape (28 layers of 3584, 152,064 logits), random weights in bf16
    on CUDA, on the prompt's text: the decode step the constraint really rides on."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = synthetic_tokenizer(QWEN_VOCAB - 293)
    heads = max(1, hidden // 128)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152_064,
            "hidden_size": hidden,
            "intermediate_size": hidden * 37 // 7,  # 18,944 at 3,584
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 7),
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        vision_config={"depth": 1, "hidden_size": 64, "out_hidden_size": hidden, "num_heads": 2},
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):  # random init on the device, then cast: the same on transformers 4 and 5
        vlm_model = Qwen2_5_VLForConditionalGeneration._from_config(config).to(dtype).eval()
    vlm_model.generation_config.eos_token_id = config.text_config.eos_token_id
    vlm_model.generation_config.pad_token_id = config.text_config.eos_token_id
    built = time.perf_counter() - start
    text = system_prompt() + "\n" + request_text("add snow", [], None, CHOICES)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=device)
    print(
        f"Qwen2.5-VL-7B-shaped language model ({layers} layers of {hidden}, random {str(dtype)[6:]} weights, "
        f"built in {built:.0f} s) on {torch.cuda.get_device_name() if device == 'cuda' else 'the CPU'}, "
        f"a {ids.shape[1]}-token prompt: ms per decode step"
    )
    print(HEADER)
    label = "7B" if (layers, hidden) == (28, 3584) else "less"
    side_by_side(
        vlm_model,
        tokenizer,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        label,
        repeats,
        tokens,
    )


def synthetic_tokenizer(size: int):
    """A byte-level BPE of `size` tokens (merges of random pairs of shorter tokens) with Qwen's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tokens, merges = list(vocab), []
    while len(vocab) < size:
        a, b = tokens[rng.randrange(len(tokens))], tokens[rng.randrange(max(256, len(tokens) // 4))]
        if len(a) + len(b) <= 12 and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
            tokens.append(a + b)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", additional_special_tokens=specials
    )


def full_vocab(size: int, logits: int, repeats: int) -> None:
    start = time.perf_counter()
    tokenizer = synthetic_tokenizer(size)
    built = time.perf_counter() - start
    logits = max(logits, len(tokenizer))
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    start = time.perf_counter()
    info = grammar.tokenizer_of(tokenizer, logits, eos)
    indexed = time.perf_counter() - start
    answer = tokenizer.encode(PLAN, add_special_tokens=False)
    costs, compiles = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        constraint = grammar.SchemaConstraint(info, answer_schema(CHOICES), logits, eos)
        compiles.append(time.perf_counter() - start)
        scores = torch.zeros(1, logits)
        for i in range(len(answer) + 1):  # a one-token prompt, then the answer as generate would grow it
            ids = torch.tensor([eos + answer[:i]])
            start = time.perf_counter()
            constraint(ids, scores)
            costs.append(time.perf_counter() - start)
    print(
        f"\nmask at {logits:,} logits (synthetic BPE of {size:,} tokens built in {built:.1f} s, indexed by "
        f"llguidance in {indexed:.1f} s; schema compiled in {statistics.median(compiles) * 1e3:.1f} ms)"
    )
    median = statistics.median(costs) * 1e3
    print(
        f"per token: median {median:.3f} ms, mean {statistics.mean(costs) * 1e3:.3f} ms, "
        f"max {max(costs) * 1e3:.3f} ms over {len(costs)} tokens"
    )
    print(f"share of a 20 ms decode step (7B, bf16, one H200): {median / 20:.1%} (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 20k vocabulary for the mask part")
    parser.add_argument("--seeds", type=int, default=2, help="tiny models (random weight seeds)")
    parser.add_argument(
        "--repeats", type=int, help="runs of each kind, interleaved (5; 3 with --full, to fit the kit's time)"
    )
    parser.add_argument(
        "--full", action="store_true", help="the 7B's language model shape, on CUDA (the GPU kit)"
    )
    parser.add_argument(
        "--layers", type=int, default=28, help="with --full: fewer layers for a smaller check"
    )
    parser.add_argument(
        "--tokens", type=int, default=64, help="with --full: decode steps per run (a random 7B rambles)"
    )
    parser.add_argument("--hidden", type=int, default=3584, help="with --full: a narrower model")
    args = parser.parse_args()
    if args.full:
        full(args.layers, args.hidden, args.repeats or 3, args.tokens)
        return
    tiny(args.seeds, args.repeats or 5)
    if args.quick:
        full_vocab(20_000, 20_003, 1)
    else:
        full_vocab(QWEN_VOCAB - 293, QWEN_VOCAB, 3)  # 151,643 tokens + specials, padded to 151,936 logits


if __name__ == "__main__":
    main()
