"""The host's settings, shared by the CLI, the chat and replay; each can be set by an ICEDIT_* variable.

The host keeps only what it uses itself (the store, which plugins run, the sampling, the early filter,
the self-check).
Every other key is a plugin's option: `Settings(preset="tiny")`, `--option preset=tiny`,
`ICEDIT_PRESET=tiny`, `ICEDIT_OPTIONS__PRESET=tiny` and `preset = "tiny"` in the config file all land
in `options`, which the plugin manager checks against the options models the plugins declare
(`assistant.plugins`) and hands to them.

The config file (`config_path()`: $ICEDIT_CONFIG, else config.toml in the user's config folder) holds
the same keys as the variables, lower case; a table holds one plugin's (`[qwen_vl]` then `vlm = ...`
is `qwen_vl.vlm`). What is given wins over the file in this order: the command line, ICEDIT_*
variables, the file, the defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from assistant.models import AttemptCount, CandidateCount, EarlySteps, Guidance, Probability, Steps

ENV_PREFIX = "ICEDIT_"
CONFIG_VARIABLE = "ICEDIT_CONFIG"
OptionValue = str | int | float | bool


def config_path() -> Path:
    """The config file: $ICEDIT_CONFIG, else config.toml in the user's config folder (may not exist)."""
    given = os.environ.get(CONFIG_VARIABLE)
    return Path(given) if given else platformdirs.user_config_path("icedit-assistant") / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    """The config file as TOML ({} when there is none); one that cannot be read is one line."""
    from assistant.errors import UserError

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"config file {path}: {getattr(e, 'strerror', None) or e}") from None


def _covers(upper: str, lower: str) -> bool:
    """Whether an option named for `upper` ('', NAME or KIND:NAME) also sets the one named for `lower`."""
    return upper in ("", lower) or lower.endswith(":" + upper)


def overlay(options: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`options` with `given` set on top, each given key replacing every form of it that it covers: the
    command line's `preset` beats the file's `[icedit] preset`, as a flag beats the file."""

    def covered(old: str) -> bool:
        owner, _, key = old.rpartition(".")
        return any(g.rpartition(".")[2] == key and _covers(g.rpartition(".")[0], owner) for g in given)

    kept = {k: v for k, v in options.items() if not covered(k)}  # within one layer, specificity decides
    return kept | {k: v for k, v in given.items() if v is not None}


ACCEPT = 0.5
"""The self-check's default threshold: the judge finds "yes" more likely than "no". A judge's P(yes) is
not calibrated across models, so no other value is better in general; --accept moves it."""


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
    judge: str = Field("qwen_vl", description="judge plugin for the early filter and the self-check")
    candidates: CandidateCount = Field(1, description="early filter: noises tried per edit (1 = off)")
    early_steps: EarlySteps = Field(4, description="early filter: steps each candidate runs before judging")
    attempts: AttemptCount = Field(
        1,
        description="self-check: seeds tried per edit until one passes (1 = no retries; more turns the check on)",
    )
    accept: Probability = Field(
        ACCEPT,
        description="self-check: the judge's P(yes) an edit needs to pass (default 0.5: yes more likely than no)",
    )
    check: bool | None = Field(
        None,
        description="self-check each edit (None: when attempts > 1; on with one attempt, its score is told)",
    )
    log: bool = Field(
        True, description="keep every edit made without --session in the day's session edits-YYYY-MM-DD"
    )
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
        ranked = [init_settings, env_settings, _OptionVariables(settings_cls), _ConfigFile(settings_cls)]
        return (_Layered(settings_cls, [*ranked, dotenv_settings, file_secret_settings]),)

    def with_options(self, **values: OptionValue | None) -> Settings:
        """A copy with these plugin options set over what was given (None: back to the plugin's default);
        a plain key replaces its `NAME.KEY` forms too, as a flag replaces what the config file says."""
        return self.model_copy(update={"options": overlay(self.options, values)})

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
            and name.upper() != CONFIG_VARIABLE
        }
        return {"options": found} if found else {}


class _ConfigFile(PydanticBaseSettingsSource):
    """The config file's keys: host fields as they are, every other key (and each table's, as
    `TABLE.KEY`) a plugin option. A file that cannot be read as TOML is one line."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        from assistant.errors import UserError

        path = config_path()
        data = read_config(path)
        found: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(
                value, dict
            ):  # [qwen_vl] vlm = ... is qwen_vl.vlm; [options] holds keys as they are
                options |= {inner if key == "options" else f"{key}.{inner}": v for inner, v in value.items()}
            elif key in self.settings_cls.model_fields:
                found[key] = value
            else:
                options[key] = value
        for key, value in options.items():
            if not isinstance(value, str | int | float | bool):
                raise UserError(f"config file {path}: {key} must be a string, a number or true/false")
        return found | ({"options": options} if options else {})


class _Layered(PydanticBaseSettingsSource):
    """The sources merged from the lowest to the highest: host fields replaced, plugin options laid on
    top (`overlay`), so a more specific key wins only over what the same source or a lower one gave."""

    def __init__(self, settings_cls: type[BaseSettings], ranked: list[PydanticBaseSettingsSource]):
        super().__init__(settings_cls)
        self.ranked = ranked

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        host: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for source in reversed(self.ranked):
            data = dict(source())
            given = dict(data.pop("options", None) or {})
            for key in [k for k in data if k not in self.settings_cls.model_fields]:
                if (value := data.pop(key)) is not None:
                    given[key] = value
            host |= data
            options = overlay(options, given)
        return host | ({"options": options} if options else {})
