"""Built-in plugin: the ICEdit engine (FLUX.1 Fill + in-context diptych + ICEdit LoRA)."""

from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec


def _engine(settings):
    from plugins.icedit.engine import IceditEngine

    return IceditEngine(settings)


def _artifacts(settings):
    from plugins.icedit.loading import artifacts

    return artifacts(settings)


def _memory(settings):
    from plugins.icedit.memory import parts

    return parts(settings)


def _describe(settings):
    from plugins.icedit.loading import adapter_kind
    from plugins.icedit.presets import get_preset

    preset = get_preset(settings.preset)
    lora = settings.lora or preset.lora
    return {
        "preset": preset.name,
        "model": settings.model or preset.model or "built in-process (random weights)",
        "lora": lora,
        "adapter": adapter_kind(settings),
        "top_k": settings.top_k,
        "lora_scale": settings.lora_scale,
        "offload": settings.offload,
        "quantize": settings.quantize,
        "compile": settings.compile,
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
        )
    )


@hookimpl
def register_cli_commands(cli):
    from plugins.icedit.commands import register

    register(cli)
