"""Prompt templates are data files in this package; `render` fills their $placeholders."""

from functools import cache
from importlib.resources import files
from string import Template


@cache
def load(name: str) -> str:
    """The template text of prompts/<name>, without its trailing newline."""
    return files(__package__).joinpath(name).read_text("utf-8").rstrip("\n")


def render(name: str, **values: str) -> str:
    """Fill a template; a missing value is a KeyError naming it."""
    return Template(load(name)).substitute(values)
