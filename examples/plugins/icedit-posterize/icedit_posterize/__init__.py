"""icedit-posterize: a sample third-party plugin for icedit-assistant.

It registers the engine `posterize` (no model: posterizes and tints the picture, step by step, from a
seeded generator) and the rewriter `tidy` (keywords for undo / redo / retry, anything else is an edit).
icedit finds it through the `icedit_assistant` entry point in pyproject.toml. Importing it stays cheap:
the engine's numpy loads in the factory, on first use.
"""

from pydantic import BaseModel, ConfigDict, Field

from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec, RewriterSpec


class PosterizeOptions(BaseModel):
    """`--option bits=2 --option strength=0.8` (or `posterize.bits=2`, or ICEDIT_OPTIONS__BITS=2)."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(3, ge=1, le=8, description="bits per channel the posterize keeps")
    strength: float = Field(0.35, ge=0, le=1, description="how far the tint is laid over the picture")


def _engine(settings, options: PosterizeOptions):
    from icedit_posterize.engine import PosterizeEngine

    return PosterizeEngine(bits=options.bits, strength=options.strength)


def _rewriter(settings):
    from icedit_posterize.rewriter import TidyRewriter

    return TidyRewriter()


@hookimpl
def register_engines(register):
    register(
        EngineSpec(
            "posterize",
            _engine,
            "posterize and tint by seed (no model, instant; a sample plugin)",
            options=PosterizeOptions,
        )
    )


@hookimpl
def register_rewriters(register):
    register(
        RewriterSpec("tidy", _rewriter, "keywords for undo/redo/retry, else the message tidied is the edit")
    )
