"""The host's settings, shared by the CLI, the chat and replay; each can be set by an ICEDIT_* variable.

The host keeps only what it uses itself (the store, which plugins run, the sampling, the early filter).
Every other key is a plugin's option: `Settings(preset="tiny")`, `--option preset=tiny`,
`ICEDIT_PRESET=tiny` and `ICEDIT_OPTIONS__PRESET=tiny` all land in `options`, which the plugin
manager checks against the options models the plugins declare (`assistant.plugins`) and hands to them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from assistant.models import CandidateCount, EarlySteps, Guidance, Steps

ENV_PREFIX = "ICEDIT_"
OptionValue = str | int | float | bool


def _default_home() -> Path:
    return platformdirs.user_data_path("icedit-assistant")


class Settings(BaseSettings):
    """What the host runs with; plugins read their own options (`options`), never the CLI's flags."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", env_nested_delimiter="__")

    home: Path = Field(default_factory=_default_home, description="folder of the session store")
    engine: str = "icedit"
    rewriter: str | None = Field(
        None, description="rewriter plugin (default: qwen_vl with real weights, rules with random ones)"
    )
    judge: str = Field("qwen_vl", description="judge plugin for the early filter")
    candidates: CandidateCount = Field(1, description="early filter: noises tried per edit (1 = off)")
    early_steps: EarlySteps = Field(4, description="early filter: steps each candidate runs before judging")
    steps: Steps = 28
    guidance: Guidance = 50.0
    options: dict[str, OptionValue] = Field(
        default_factory=dict,
        description="plugins' options, KEY or NAME.KEY -> value (--option, ICEDIT_KEY, ICEDIT_OPTIONS__KEY)",
    )

    @model_validator(mode="before")
    @classmethod
    def _plugin_keys(cls, data: Any) -> Any:
        """A key the host does not hold is a plugin's option (None: not given, the plugin's default)."""
        if not isinstance(data, dict):
            return data
        host = {k: v for k, v in data.items() if k in cls.model_fields}
        given = {k: v for k, v in data.items() if k not in cls.model_fields and v is not None}
        if given:
            host["options"] = {**dict(host.get("options") or {}), **given}
        return host

    @field_validator("home", mode="before")
    @classmethod
    def _a_folder(cls, value: object) -> object:
        """ICEDIT_HOME set but empty would put the store in whatever folder the command runs in."""
        if isinstance(value, str | Path) and not str(value).strip():
            raise ValueError(
                "ICEDIT_HOME is set but empty: unset it, or give the folder for the session store"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _OptionVariables(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    def with_options(self, **values: OptionValue | None) -> Settings:
        """A copy with these plugin options given too (None: back to the plugin's default)."""
        options = dict(self.options)
        for key, value in values.items():
            options.pop(key, None)
            if value is not None:
                options[key] = value
        return self.model_copy(update={"options": options})

    @property
    def store_path(self) -> Path:
        return self.home / "sessions.sqlite3"


class _OptionVariables(PydanticBaseSettingsSource):
    """ICEDIT_<KEY> for a key the host does not hold: that plugin option (ICEDIT_PRESET=tiny)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # not per field: __call__ reads them all

    def __call__(self) -> dict[str, Any]:
        host = {name.upper() for name in self.settings_cls.model_fields}
        found = {
            name[len(ENV_PREFIX) :].lower(): value
            for name, value in os.environ.items()
            if name.upper().startswith(ENV_PREFIX)
            and "__" not in name
            and name[len(ENV_PREFIX) :].upper() not in host
        }
        return {"options": found} if found else {}
