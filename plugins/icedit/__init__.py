"""Built-in plugin: the ICEdit engine (FLUX.1 Fill + in-context diptych + ICEdit LoRA)."""

from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec


def _engine(settings):
    from plugins.icedit.engine import IceditEngine

    return IceditEngine(settings)


@hookimpl
def register_engines(register):
    register(EngineSpec("icedit", _engine, "ICEdit: FLUX.1 Fill paints the right half of an in-context diptych"))
