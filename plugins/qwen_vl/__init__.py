"""Built-in plugin: Qwen2.5-VL as rewriter and judge, one lazily loaded model shared by both."""

from assistant.hookspecs import hookimpl
from assistant.plugins import JudgeSpec, RewriterSpec, ScorerSpec
from plugins.qwen_vl.options import QwenVlOptions


def _rewriter(settings, options):
    from plugins.qwen_vl.rewriter import QwenRewriter

    return QwenRewriter(options)


def _judge(settings, options):
    from plugins.qwen_vl.judge import QwenJudge, QwenPairJudge

    # with no VLM (--vlm none) there is nothing to check an edit with: the agent says so, once per edit
    return QwenPairJudge(options) if options.vlm == "none" else QwenJudge(options)


def _vie(settings, options):
    from plugins.qwen_vl.vie_score import QwenVieScorer

    return QwenVieScorer(options)


def _artifacts(settings, options):
    from plugins.qwen_vl.weights import artifact

    found = artifact(options)
    return [found] if found else []


def _memory(settings, options):
    from plugins.qwen_vl.memory import parts

    return parts(settings, options)


def _scoring_memory(settings, options):
    from plugins.qwen_vl.memory import parts

    return parts(settings, options, scoring=True)


@hookimpl
def register_rewriters(register):
    register(
        RewriterSpec(
            "qwen_vl",
            _rewriter,
            "Qwen2.5-VL reads the image and the request (rules as fallback)",
            artifacts=_artifacts,
            memory=_memory,
            options=QwenVlOptions,
        )
    )


@hookimpl
def register_judges(register):
    register(
        JudgeSpec(
            "qwen_vl",
            _judge,
            "Qwen2.5-VL: which of two candidates follows the instruction",
            artifacts=_artifacts,
            memory=_memory,
            options=QwenVlOptions,
        )
    )


@hookimpl
def register_scorers(register):
    register(
        ScorerSpec(
            "qwen_vl",
            _vie,
            "VIEScore-style 0-10 ratings by Qwen2.5-VL: semantic consistency (SC), quality (PQ), overall",
            artifacts=_artifacts,
            memory=_scoring_memory,
            options=QwenVlOptions,
        )
    )
