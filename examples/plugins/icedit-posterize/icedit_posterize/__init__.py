"""icedit-posterize: a sample third-party plugin for icedit-assistant.

It registers the engine `posterize` (no model: posterizes and tints the picture, step by step, from a
seeded generator) and the rewriter `tidy` (keywords for undo / redo / retry, anything else is an edit).
icedit finds it through the `icedit_assistant` entry point in pyproject.toml. Importing it stays cheap:
the engine's numpy loads in the factory, on first use.
"""

from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec, RewriterSpec


def _engine(settings):
    from icedit_posterize.engine import PosterizeEngine

    return PosterizeEngine()


def _rewriter(settings):
    from icedit_posterize.rewriter import TidyRewriter

    return TidyRewriter()


@hookimpl
def register_engines(register):
    register(
        EngineSpec("posterize", _engine, "posterize and tint by seed (no model, instant; a sample plugin)")
    )


@hookimpl
def register_rewriters(register):
    register(
        RewriterSpec("tidy", _rewriter, "keywords for undo/redo/retry, else the message tidied is the edit")
    )
