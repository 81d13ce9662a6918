"""Built-in plugin: the Kontext engine (FLUX.1 Kontext dev edits the source, told the instruction).

Imports here stay light (no torch, no diffusers): the CLI lists and checks engines without loading them.
"""

from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec
from plugins.kontext.options import KontextOptions


def _engine(settings, options):
    from plugins.kontext.engine import KontextEngine

    return KontextEngine(options)


def _artifacts(settings, options):
    from plugins.kontext.loading import artifacts

    return artifacts(options)


def _describe(settings, options):
    from plugins.kontext.loading import asked_lora
    from plugins.kontext.presets import get_preset

    preset = get_preset(options.preset)
    return {
        "preset": preset.name,
        "model": options.model or preset.model or "built in-process (random weights)",
        "lora": asked_lora(options),
        "lora_scale": options.lora_scale,
        "offload": options.offload,
        "quantize": options.quantize,
        "compile": options.compile,
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
            options=KontextOptions,
        )
    )
