"""The layers run one way (README "Developing"): every import of ours, module level or inside a function,
is checked against what its package may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SESSIONS_MAY_USE = {"assistant.errors", "assistant.text", "assistant.files", "assistant.models"}
"""The shared leaf modules of `assistant/`: errors, text and file safety, the typed records a turn keeps."""
PLUGINS_MAY_NOT_USE = ("assistant.agent", "assistant.cli", "assistant.replay", "assistant.tui", "sessions")


def imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports (`from x import y` counts x and x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("assistant", "plugins", "sessions", "prompts")}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def is_module(name: str) -> bool:
    parts = name.split(".")
    return (ROOT.joinpath(*parts).with_suffix(".py")).exists() or (
        ROOT.joinpath(*parts) / "__init__.py"
    ).exists()


@pytest.mark.parametrize("path", modules("sessions"), ids=lambda p: p.name)
def test_sessions_use_only_the_shared_leaf_modules_of_the_assistant(path):
    used = {name for name in imports(path) if is_module(name)}
    wrong = {n for n in used if n.startswith(("assistant", "plugins")) and n not in SESSIONS_MAY_USE}
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


@pytest.mark.parametrize("path", modules("plugins"), ids=lambda p: str(p.relative_to(ROOT / "plugins")))
def test_plugins_use_the_contract_not_the_drivers_or_the_store(path):
    wrong = {n for n in imports(path) if n.startswith(PLUGINS_MAY_NOT_USE)}
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


@pytest.mark.parametrize("path", modules("assistant"), ids=lambda p: str(p.relative_to(ROOT / "assistant")))
def test_the_assistant_reaches_plugins_only_through_the_plugin_manager(path):
    name = str(path.relative_to(ROOT))
    wrong = {n for n in imports(path) if n.startswith("plugins") and is_module(n)}
    assert not wrong, f"{name} imports {sorted(wrong)}"


def test_the_checks_see_the_imports_they_are_about():
    """The walker finds function-level imports too (the CLI imports inside its commands)."""
    assert "assistant.images" in imports(ROOT / "assistant" / "cli.py")
    assert "plugins.evaluation.run" in imports(ROOT / "plugins" / "evaluation" / "command.py")
    assert "assistant.agent" in imports(ROOT / "assistant" / "replay.py")
