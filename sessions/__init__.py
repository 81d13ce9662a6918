"""The session data: history, the SQLite store, image identity, replay scripts, archives, sheets.

Layering (tests/test_layers.py): sessions/ uses only the shared leaf modules of assistant/ (errors,
text and file safety, the typed records of `assistant.models` that a stored turn is held to), never
the agent, the CLI, the chat, replay's runner or a plugin. DESIGN.md asked for the errors alone; the
archive validates imported turns with the very models the agent writes them with, and sharing one
definition of a plan and of each range beats a second copy that could drift, so those leaf modules
are the shared base instead.
"""
