"""Loading a service's settings: one TOML file, environment variables, command-line flags.

    flags (overrides) > PREFIX_* environment > TOML file > defaults

The agent and the controller each declare a pydantic-settings class; this module reads
it the same way for both and turns every bad key into one `ConfigError` that names the
key and the file.
"""

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource

from slmops.errors import ConfigError, describe_validation

S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], config_file: Path | None, overrides: dict[str, Any], what: str) -> S:
    """`cls` from the file, the environment and `overrides` (None values are ignored)."""
    toml: dict[str, Any] = {}
    if config_file is not None:
        try:
            toml = tomllib.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {config_file} is not valid TOML: {e}") from None

    class FromFile(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            **_: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=toml))

    try:
        loaded = FromFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        problems = describe_validation(e.errors())
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"bad {what} configuration{where}: {problems}") from None
    # The plain class, not FromFile; field values as validated (nested models stay models).
    return cls.model_construct(**{name: getattr(loaded, name) for name in cls.model_fields})
