"""The Textual chat: `icedit chat` (see app.py for the factory the CLI and the tests share)."""
