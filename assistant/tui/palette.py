"""The chat's slash commands as entries of Textual's command palette (Ctrl+P), the plugins' too."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from assistant.plugins import CommandSpec


class ChatCommands(Provider):
    """Choosing a command runs it; one that takes an argument is put in the input to finish."""

    def _entries(self) -> list[tuple[str, CommandSpec]]:
        from assistant.tui.screens.chat import ChatScreen

        screen = self.screen
        return list(screen.chat.commands.items()) if isinstance(screen, ChatScreen) else []

    def _choose(self, name: str, spec: CommandSpec) -> None:
        usage = spec.usage or f"/{name}"
        if " " in usage:
            self.screen.prompt_with(f"/{name} ")  # type: ignore[attr-defined]  # a ChatScreen (_entries)
        else:
            self.screen.action_command(f"/{name}")  # type: ignore[attr-defined]

    async def discover(self) -> Hits:
        for name, spec in self._entries():
            yield DiscoveryHit(spec.usage or f"/{name}", partial(self._choose, name, spec), help=spec.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, spec in self._entries():
            text = spec.usage or f"/{name}"
            if (score := matcher.match(f"{text} {spec.help}")) > 0:
                yield Hit(score, matcher.highlight(text), partial(self._choose, name, spec), help=spec.help)
