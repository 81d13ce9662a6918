"""Built-in plugin: `icedit eval` for any engine, and the `magicbrush` scorer (MagicBrush and Emu Edit
metrics). Other scorers come from any plugin's `register_scorers` (qwen_vl adds its VIEScore ratings).

Imports here stay light: the CLI lists scorers without loading torch or a model.
"""

from assistant.hookspecs import hookimpl
from assistant.plugins import ScorerSpec
from plugins.evaluation.options import FeatureOptions


def _magicbrush(settings, options):
    from plugins.evaluation.metrics import magicbrush

    return magicbrush(settings, options)


def _artifacts(settings, options):
    from plugins.evaluation.features import artifacts

    return artifacts(settings, options)


@hookimpl
def register_scorers(register):
    register(
        ScorerSpec(
            "magicbrush",
            _magicbrush,
            "MagicBrush and Emu Edit metrics: L1, L2, CLIP-I, DINO, CLIP-T, CLIP-dir (against target and source)",
            artifacts=_artifacts,
            options=FeatureOptions,
            default=True,
        )
    )


@hookimpl
def register_cli_commands(cli):
    from plugins.evaluation.command import eval_cmd

    cli.add_command(eval_cmd)
