"""Built-in plugin: the Kontext engine (FLUX.1 Kontext dev edits the source, told the instruction).

Imports here stay light (no torch, no diffusers): the CLI lists and checks engines without loading them.
"""

from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec


def _engine(settings):
    from plugins.kontext.engine import KontextEngine

    return KontextEngine(settings)


def _artifacts(settings):
    from plugins.kontext.loading import artifacts

    return artifacts(settings)


def _describe(settings):
    from plugins.kontext.loading import asked_lora
    from plugins.kontext.presets import get_preset

    preset = get_preset(settings.preset)
    return {
        "preset": preset.name,
        "model": settings.model or preset.model or "built in-process (random weights)",
        "lora": asked_lora(settings),
        "lora_scale": settings.lora_scale,
        "offload": settings.offload,
        "quantize": settings.quantize,
        "compile": settings.compile,
    }


@hookimpl
def register_engines(register):
    register(
        EngineSpec(
            "kontext",
            _engine,
            "FLUX.1 Kontext dev: edits the picture itself from the plain instruction (try --guidance 2.5)",
            describe=_describe,
            artifacts=_artifacts,
        )
    )
