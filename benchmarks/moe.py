"""LoRA-MoE forward: our stacked layer vs the reference formulation, side by side at FLUX shapes.

The reference (ICEdit's patched peft) applies every expert to every token and weights the
results: N pairs of matmuls. Our layer holds the experts stacked and computes them two ways:
dense (two matmuls and a gate, every expert on every token) and routed (each expert on just the
tokens that chose it). `LoraMoeLinear.delta` routes on a CPU when fewer than half the experts
are chosen and runs dense otherwise; the `ours` column is that choice, and the `speedup` line
(geometric mean over the rows) compares it with the reference. All columns of a row are timed in
interleaved rounds, best of `--repeats`. Shapes are the two MoE targets of FLUX.1 Fill: double
blocks' ff.net.2 (12288 -> 3072) and single blocks' proj_out (15360 -> 3072), 4 experts of rank
32, 3584 tokens: what proj_out sees for a 1024x768 diptych (3072 image + 512 text tokens);
ff.net.2 sees the 3072 image tokens alone, so its row runs slightly more tokens than it would.

    python benchmarks/moe.py --quick      # 512 tokens, for a CPU
    python benchmarks/moe.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch import nn

from plugins.icedit.moe import LoraMoeLinear


def reference_delta(layer: LoraMoeLinear, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the top-k softmax gate (the published formulation)."""
    gates = layer.gates(x)
    out = 0
    experts = zip(layer.lora_A.split(layer.rank, dim=0), layer.lora_B.split(layer.rank, dim=1), strict=True)
    for i, (a, b) in enumerate(experts):
        out = out + gates[..., i : i + 1] * nn.functional.linear(nn.functional.linear(x, a), b)
    return out


def timed(fns, x, repeats: int) -> list[float]:
    """Best seconds of each function over `repeats` rounds; each round runs every function once, so
    all of them see the same machine (a shared CPU's speed drifts between runs)."""

    def run(fn):
        start = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns:
        run(fn)  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        best = [min(b, run(fn)) for b, fn in zip(best, fns, strict=True)]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens instead of 3584")
    parser.add_argument("--tokens", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tokens = 512 if args.quick else args.tokens
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ratios = []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {tokens} tokens, "
        f"{args.experts} experts of rank {args.rank}, {dtype} on {device}"
    )
    print(
        "The base Linear is the same on every side; the other columns time the experts' contribution alone."
    )
    print(
        f"{'layer':<10} {'top-k':>5} {'base ms':>9} {'reference':>10} {'dense':>8} {'routed':>8} {'ours':>8} "
        f"{'speedup':>8} {'ours/base':>10}"
    )
    with torch.no_grad():
        for name, fan_in in (("ff.net.2", 12288), ("proj_out", 15360)):
            base = nn.Linear(fan_in, 3072, device=device, dtype=dtype)
            x = torch.randn(1, tokens, fan_in, device=device, dtype=dtype)
            for top_k in (1, 2):
                layer = LoraMoeLinear(base, args.experts, args.rank, top_k)
                for p in (layer.lora_A, layer.lora_B, layer.lora_route):
                    p.normal_(std=0.02)
                reference = functools.partial(reference_delta, layer)
                expected = reference(x).float()
                for delta in (layer.delta, layer.dense_delta, layer.routed_delta):  # equal up to rounding:
                    error = (
                        delta(x).float() - expected
                    ).norm() / expected.norm()  # bf16 sums round per expert
                    assert error < (2e-2 if dtype == torch.bfloat16 else 1e-5), (
                        f"{delta.__name__}: {error:.1e}"
                    )
                (t_base,) = timed([base], x, 3)  # only the last column's scale: three runs do
                t_ref, t_dense, t_routed, t_ours = timed(
                    [reference, layer.dense_delta, layer.routed_delta, layer.delta], x, args.repeats
                )
                ratios.append(t_ref / t_ours)
                print(
                    f"{name:<10} {top_k:>5} {t_base * 1e3:>9.2f} {t_ref * 1e3:>10.2f} {t_dense * 1e3:>8.2f} "
                    f"{t_routed * 1e3:>8.2f} {t_ours * 1e3:>8.2f} {t_ref / t_ours:>7.2f}x {t_ours / t_base:>9.1%}"
                )
    geo = torch.tensor(ratios).log().mean().exp().item()
    print(f"speedup {geo:.2f}")


if __name__ == "__main__":
    main()
