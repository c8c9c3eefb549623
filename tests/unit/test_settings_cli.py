"""Settings validation and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.errors import ConfigError
from infra.settings import CommonSettings, load
from serving.settings import ServeSettings
from tide import cli


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDE_SERVE_PORT", "eighty")
    with pytest.raises(ConfigError, match="TIDE_SERVE_PORT"):
        load(ServeSettings)
    monkeypatch.setenv("TIDE_SERVE_PORT", "8080")
    assert load(ServeSettings).serve_port == 8080


def test_running_stack_supplies_defaults_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(
        json.dumps({"kafka_bootstrap": "127.0.0.1:1", "redis_url": "redis://x:2/0"})
    )
    monkeypatch.setenv("TIDE_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("TIDE_KAFKA_BOOTSTRAP", raising=False)
    assert load(CommonSettings).kafka_bootstrap == "127.0.0.1:1"
    monkeypatch.setenv("TIDE_KAFKA_BOOTSTRAP", "broker:9092")
    assert load(CommonSettings).kafka_bootstrap == "broker:9092"


def test_cli_reports_config_errors_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIDE_TOPIC_PREFIX", "bad prefix!")
    assert cli.main(["topics"]) == 2
    assert "TIDE_TOPIC_PREFIX" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) >= {
        "up",
        "down",
        "status",
        "produce",
        "tail",
        "serve",
        "features",
        "train",
        "drift",
        "demo",
        "init",
        "plan",
        "apply",
    }
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: tide " + name in capsys.readouterr().out
