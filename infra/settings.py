"""Settings: one frozen object per service, read from ``TIDE_*`` environment variables.

Every service builds its settings once in its entry point (:func:`load`) and passes them down; nothing
else reads the environment. When ``TIDE_KAFKA_BOOTSTRAP`` / ``TIDE_REDIS_URL`` are unset and an embedded
stack is running (``tide up``), its addresses are taken from the stack's state file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from infra.errors import ConfigError

ENV_PREFIX = "TIDE_"
DEFAULT_STATE_DIR = Path(".tide")
STACK_FILE = "stack.json"


class _StackFileSource(PydanticBaseSettingsSource):
    """Lowest-priority source: the addresses of a running embedded stack, if there is one."""

    def _values(self) -> dict[str, Any]:
        state_dir = Path(self.current_state.get("state_dir") or DEFAULT_STATE_DIR)
        path = state_dir / STACK_FILE
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        return {k: data[k] for k in ("kafka_bootstrap", "redis_url") if k in data}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._values()


class CommonSettings(BaseSettings):
    """Where Kafka and Redis are, and how topics are named. Every service extends this."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    topic_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    # Kafka's group session timeout. Small values make group joins fast (the embedded broker waits half
    # of it on every join); production keeps a larger one.
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    state_dir: Path = DEFAULT_STATE_DIR
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # The project folder: `tide plan` / `tide apply` read its definitions; services read definitions from
    # the registry and only import the project's code (learner factories, pickled pipelines) from here.
    project: Path | None = None
    # Prometheus exposition for processes without an HTTP API of their own (serving has /metrics).
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _StackFileSource(settings_cls)


S = TypeVar("S", bound=CommonSettings)


def load(cls: type[S], **overrides: Any) -> S:
    """Build ``cls`` from the environment, turning validation errors into one :class:`ConfigError`."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
    except SettingsError as exc:  # a complex value (a list, an object) that is not valid JSON
        field = re.search(r'field "(\w+)"', str(exc))
        key = env_var(field.group(1)) if field else "a setting"
        raise ConfigError(f"invalid settings: {key}: not valid JSON ({exc})") from None


def env_var(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return ENV_PREFIX + field_name.upper()
