"""The agent's own cost per turn (store commit, PNG encoding and hashing, bookkeeping) beside a tiny edit.

Both are measured in the same turns: the agent times the rewriter and the engine, and what is left
of the turn is its own overhead. Target: at most 5% of a tiny-preset edit, which runs the default
step count unless --steps says otherwise.

    python benchmarks/agent.py --quick
    python benchmarks/agent.py --steps 8   # a shorter edit: the same overhead is a larger share
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image

from assistant.agent import Agent
from assistant.settings import Settings
from sessions.store import Store

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chelsea.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 turns")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--steps", type=int, default=Settings.model_fields["steps"].default)
    args = parser.parse_args()
    turns, steps = (3 if args.quick else args.turns), args.steps
    source = Image.open(EXAMPLE).convert("RGB")
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), preset="tiny", steps=steps)
        with Store(settings.store_path) as store:
            agent = Agent(store, "bench", settings)
            agent.turn("make it look like winter", source=(source, "open chelsea"), seed=0)  # loads the model
            totals = {"rewrite": 0.0, "engine": 0.0, "agent": 0.0, "total": 0.0}
            for n in range(turns):
                start = time.perf_counter()
                outcome = agent.turn(f"add {n + 1} snowflakes", seed=n)
                t = outcome.timings
                totals["total"] += time.perf_counter() - start
                totals["rewrite"] += t["rewrite"]
                totals["agent"] += t["agent"]
                totals["engine"] += t["total"] - t["rewrite"] - t["agent"]
    per = {k: v / turns for k, v in totals.items()}
    print(
        f"tiny preset, {source.width}x{source.height} source, {steps} steps, {turns} turns, file-backed store"
    )
    print(f"engine {per['engine'] * 1e3:8.1f} ms/turn")
    print(f"rewrite {per['rewrite'] * 1e3:7.1f} ms/turn (rules)")
    print(f"agent  {per['agent'] * 1e3:8.1f} ms/turn (commit, PNG encode + sha256, bookkeeping)")
    print(f"agent share {per['agent'] / per['total']:.1%} of a turn (target <= 5%)")


if __name__ == "__main__":
    main()
