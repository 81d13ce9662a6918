"""Built-in plugin: the ICEdit engine (FLUX.1 Fill + in-context diptych + ICEdit LoRA), `icedit train`,
and the scorer `toy` of the toy preset's world of shapes."""

from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec, ScorerSpec
from plugins.icedit.options import IceditOptions


def _engine(settings, options):
    from plugins.icedit.engine import IceditEngine

    return IceditEngine(options)


def _artifacts(settings, options):
    from plugins.icedit.loading import artifacts

    return artifacts(options)


def _memory(settings, options):
    from plugins.icedit.memory import parts

    return parts(settings, options)


def _describe(settings, options):
    from plugins.icedit.loading import adapter_kind
    from plugins.icedit.presets import get_preset

    preset = get_preset(options.preset)
    return {
        "preset": preset.name,
        "model": options.model or preset.model or "built in-process (random weights)",
        "lora": options.lora or preset.lora,
        "adapter": adapter_kind(options),
        "top_k": options.top_k,
        "lora_scale": options.lora_scale,
        "offload": options.offload,
        "quantize": options.quantize,
        "compile": options.compile,
    }


@hookimpl
def register_engines(register):
    register(
        EngineSpec(
            "icedit",
            _engine,
            "ICEdit: FLUX.1 Fill paints the right half of an in-context diptych",
            describe=_describe,
            artifacts=_artifacts,
            memory=_memory,
            options=IceditOptions,
        )
    )


def _toy_scorer(settings):
    from plugins.icedit.toy.scorer import ColourScorer

    return ColourScorer()


@hookimpl
def register_scorers(register):
    register(
        ScorerSpec(
            "toy",
            _toy_scorer,
            "the toy world's colour_hit: does the edit paint the asked colour where the target changes",
        )
    )


@hookimpl
def register_cli_commands(cli):
    from plugins.icedit.commands import register

    register(cli)
