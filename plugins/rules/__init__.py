"""Built-in plugin: the offline rules rewriter."""

from assistant.hookspecs import hookimpl
from assistant.plugins import RewriterSpec


@hookimpl
def register_rewriters(register):
    from plugins.rules.rewriter import RulesRewriter

    register(RewriterSpec("rules", lambda settings: RulesRewriter(), "offline rules: no model, instant"))
