"""The production stack (docker-compose.yml, infra/docker/Dockerfile, .dockerignore) checked without Docker.

No Docker engine runs where the tests run, so the stack is checked against the code it starts: every Tide
service's command must parse with ``tide``'s own parser, every ``TIDE_*`` variable must be a setting of the
class that command loads and validate with it, the addresses must name the services and the ports they
listen on, images must be pinned, nothing may be published beyond 127.0.0.1, and the image must install
what pyproject.toml pins.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from infra.settings import ENV_PREFIX, CommonSettings, load
from tide.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK_FILE = ROOT / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Modules that define the services' settings classes (all CommonSettings subclasses). streams.drift may
# land after this test: a missing module is tolerated here, so only the variables it would define fail
# (as unknown), and the drift service is then validated against CommonSettings.
SETTINGS_MODULES = (
    "features.settings",
    "online_training.trainer",
    "serving.settings",
    "streams.drift",
    "streams.judge",
)
OPTIONAL_SETTINGS_MODULES = {"streams.drift"}

# The settings class each subcommand builds (see tide/cli.py's cmd_* functions).
COMMAND_SETTINGS = {
    "serve": "ServeSettings",
    "features": "FeatureSettings",
    "train": "TrainerSettings",
    "retrain": "RetrainSettings",  # online_training.settings, imported by online_training.trainer
    "drift": "DriftSettings",
    "judge": "JudgeSettings",
    "topics": "CommonSettings",
    "apply": "CommonSettings",
    "registry": "CommonSettings",
    "produce": "CommonSettings",
    "tail": "CommonSettings",
}
ONE_SHOT_COMMANDS = {"topics", "apply", "registry", "produce", "tail"}
PROCESSOR_COMMANDS = {"serve", "features", "train", "drift", "judge"}
HEALTHY = "service_healthy"
COMPLETED = "service_completed_successfully"
DEPENDS_CONDITIONS = {"service_started", HEALTHY, COMPLETED}
LONG_RUNNING_RESTART = {"unless-stopped", "always"}


# --- reading the files -------------------------------------------------------------------------------


def _interpolate(value: str) -> str:
    """Compose's variable interpolation, with every variable unset: ``${X:-d}`` -> d, ``$$`` -> ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        default = m.group("default")
        assert default is not None, f"{m.group(0)} has no default: the file would depend on the host's env"
        return default

    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}", sub, value)


def _load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), (
        "docker-compose.yml has no services"
    )
    return doc


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def _is_tide(svc: dict[str, Any]) -> bool:
    return "build" in svc or str(svc.get("image", "")).startswith("tide-ml:")


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    assert cmd, "a Tide service needs an explicit command (the image's default only prints help)"
    return shlex.split(_interpolate(cmd)) if isinstance(cmd, str) else [_interpolate(str(c)) for c in cmd]


TIDE_SERVICES = sorted(name for name, svc in SERVICES.items() if _is_tide(svc))
# Services `up` starts and keeps running: not behind a profile, not a one-shot command.
LONG_RUNNING = sorted(
    name
    for name, svc in SERVICES.items()
    if not svc.get("profiles") and not (_is_tide(svc) and _command(svc)[0] in ONE_SHOT_COMMANDS)
)


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        assert all(len(p) == 2 for p in pairs), f"variables taken from the host's environment: {env}"
        env = dict(pairs)
    out = {}
    for key, value in env.items():
        # YAML turns yes/no/true/false into booleans, which compose refuses or rewrites: quote them
        assert not isinstance(value, bool), f"{key}: quote boolean-looking values"
        assert value is not None, f"{key}: no value (it would come from the host's environment)"
        out[key] = _interpolate(str(value))
    return out


def _depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        full = buf + line
        buf = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def _build_of(name: str) -> dict[str, Any]:
    build = SERVICES[name]["build"]
    return {"context": build} if isinstance(build, str) else build


def _dockerfile_path(name: str) -> Path:
    build = _build_of(name)
    return (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1] :]


def _dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in _final_stage(instructions):
        if ins == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=value (got {item!r})"
                env[key] = value
    return env


def _all_subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _settings_classes() -> dict[str, type[CommonSettings]]:
    for module in SETTINGS_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if module not in OPTIONAL_SETTINGS_MODULES or exc.name != module:
                raise
    return {cls.__name__: cls for cls in (CommonSettings, *_all_subclasses(CommonSettings))}


SETTINGS_CLASSES = _settings_classes()


def _settings_class(command: str) -> type[CommonSettings]:
    assert command in COMMAND_SETTINGS, (
        f"no settings class known for `tide {command}`: add it to COMMAND_SETTINGS"
    )
    return SETTINGS_CLASSES.get(COMMAND_SETTINGS[command], CommonSettings)


def _tide_dockerfile_instructions() -> list[tuple[str, str]]:
    builds = {_dockerfile_path(n) for n in TIDE_SERVICES if "build" in SERVICES[n]}
    assert len(builds) == 1, f"the Tide services must share one image, built from one Dockerfile: {builds}"
    path = builds.pop()
    assert path.is_file(), f"{path} (the build's dockerfile) does not exist"
    return _instructions(path.read_text())


def _service_env(name: str) -> dict[str, str]:
    """The TIDE_* environment a Tide service's process sees: the image's ENV, then compose's."""
    env = {
        k: v for k, v in _dockerfile_env(_tide_dockerfile_instructions()).items() if k.startswith(ENV_PREFIX)
    }
    env.update({k: v for k, v in _environment(SERVICES[name]).items() if k.startswith(ENV_PREFIX)})
    return env


def _effective_settings(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CommonSettings:
    """The settings the service's command builds, from its environment only (nothing of this host's)."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in _service_env(name).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no embedded stack's state file to fall back on
    return load(_settings_class(_command(SERVICES[name])[0]))


def _kafka_service() -> tuple[str, dict[str, str]]:
    found = [(n, s) for n, s in SERVICES.items() if str(s.get("image", "")).startswith("apache/kafka:")]
    assert len(found) == 1, f"expected one apache/kafka service, found {[n for n, _ in found]}"
    name, svc = found[0]
    return name, _environment(svc)


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``PLAINTEXT://host:9092,CONTROLLER://:9093`` -> {listener name: (host, port)}."""
    out = {}
    for item in value.split(","):
        m = re.fullmatch(r"(\w+)://(.*):(\d+)", item.strip())
        assert m, f"cannot parse listener {item!r}"
        out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def _ports(svc: dict[str, Any]) -> list[tuple[str | None, str | None, int]]:
    """Published ports as (host_ip, host_port, container_port)."""
    out: list[tuple[str | None, str | None, int]] = []
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            out.append(
                (entry.get("host_ip"), str(entry.get("published") or "") or None, int(entry["target"]))
            )
            continue
        spec = str(entry).split("/", 1)[0]
        m = re.fullmatch(r"(?:(?:(?P<ip>\[[^\]]+\]|[\d.]+):)?(?P<host>[\d-]*):)?(?P<ctr>\d+)", spec)
        assert m, f"cannot parse port {entry!r}"
        out.append((m.group("ip"), m.group("host") or None, int(m.group("ctr"))))
    return out


def _healthcheck_test(svc: dict[str, Any]) -> str | None:
    hc = svc.get("healthcheck")
    if not hc or hc.get("disable"):
        return None
    test = hc.get("test")
    if isinstance(test, list):
        assert test and test[0] in {"CMD", "CMD-SHELL"}, (
            f"healthcheck test must start with CMD or CMD-SHELL: {test}"
        )
        assert len(test) > 1, "empty healthcheck"
        return " ".join(test[1:])
    assert isinstance(test, str) and test.strip(), f"bad healthcheck test {test!r}"
    return test


# --- the compose file ----------------------------------------------------------------------------------


def test_compose_file_shape() -> None:
    assert "version" not in COMPOSE, "the compose spec has no `version:` (compose warns it is obsolete)"
    expected = {"kafka", "redis", "apply", "features", "trainer", "drift", "judge", "serve"}
    assert expected <= set(SERVICES), f"missing services: {sorted(expected - set(SERVICES))}"
    declared = set(COMPOSE.get("volumes") or {})
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes") or []:
            spec = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(vol))  # ${VAR:-default} -> its default
            source = vol.get("source") if isinstance(vol, dict) else spec.split(":", 1)[0]
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: named volume {source!r} is not declared at the top level"


# Keys of the compose specification (compose-spec/schema/compose-spec.json); with no engine here to reject
# a misspelt key, these catch typos such as `depends-on` or `healtcheck`. A key the spec has gained since
# belongs here.
TOP_LEVEL_KEYS = {"name", "include", "services", "models", "networks", "volumes", "secrets", "configs"}
SERVICE_KEYS = {
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup", "cgroup_parent",
    "command", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_shares", "cpu_quota",
    "cpu_period", "cpu_rt_period", "cpu_rt_runtime", "cpus", "cpuset", "credential_spec", "depends_on",
    "deploy", "develop", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname",
    "entrypoint", "env_file", "label_file", "environment", "expose", "extends", "provider",
    "external_links", "extra_hosts", "gpus", "group_add", "healthcheck", "hostname", "image", "init", "ipc",
    "isolation", "labels", "links", "logging", "mac_address", "mem_limit", "mem_reservation",
    "mem_swappiness", "memswap_limit", "network_mode", "models", "networks", "oom_kill_disable",
    "oom_score_adj", "pid", "pids_limit", "platform", "ports", "post_start", "pre_stop", "privileged",
    "profiles", "pull_policy", "pull_refresh_after", "read_only", "restart", "runtime", "scale",
    "security_opt", "shm_size", "secrets", "sysctls", "stdin_open", "stop_grace_period", "stop_signal",
    "storage_opt", "tmpfs", "tty", "ulimits", "use_api_socket", "user", "userns_mode", "uts", "volumes",
    "volumes_from", "working_dir",
}  # fmt: skip
BUILD_KEYS = {
    "context", "dockerfile", "dockerfile_inline", "entitlements", "args", "ssh", "labels", "cache_from",
    "cache_to", "no_cache", "additional_contexts", "network", "pull", "target", "shm_size", "extra_hosts",
    "isolation", "privileged", "secrets", "tags", "ulimits", "platforms",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DEPENDS_ON_KEYS = {"condition", "restart", "required"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
DURATION = re.compile(r"(\d+(\.\d+)?(us|ms|s|m|h))+")


def _unknown(keys: Any, allowed: set[str]) -> list[str]:
    return sorted(k for k in keys if k not in allowed and not str(k).startswith("x-"))


def test_compose_keys_are_in_the_spec() -> None:
    assert not _unknown(COMPOSE, TOP_LEVEL_KEYS), (
        f"unknown top-level keys {_unknown(COMPOSE, TOP_LEVEL_KEYS)}"
    )
    for name, svc in SERVICES.items():
        assert re.fullmatch(r"[a-zA-Z0-9._-]+", name), f"service name {name!r}"
        assert not _unknown(svc, SERVICE_KEYS), f"{name}: unknown keys {_unknown(svc, SERVICE_KEYS)}"
        if isinstance(svc.get("build"), dict):
            assert not _unknown(svc["build"], BUILD_KEYS), (
                f"{name}: build keys {_unknown(svc['build'], BUILD_KEYS)}"
            )
        hc = svc.get("healthcheck") or {}
        assert not _unknown(hc, HEALTHCHECK_KEYS), (
            f"{name}: healthcheck keys {_unknown(hc, HEALTHCHECK_KEYS)}"
        )
        for key in ("interval", "timeout", "start_period", "start_interval"):
            if key in hc:
                assert DURATION.fullmatch(str(hc[key])), (
                    f"{name}: healthcheck {key}={hc[key]!r} is no duration"
                )
        if "retries" in hc:
            assert isinstance(hc["retries"], int), f"{name}: healthcheck retries must be a number"
        if "stop_grace_period" in svc:
            assert DURATION.fullmatch(str(svc["stop_grace_period"])), f"{name}: stop_grace_period"
        if "restart" in svc:
            policy = str(svc["restart"]).split(":")[0]
            assert policy in RESTART_POLICIES, f"{name}: restart {svc['restart']!r}"
        deps = svc.get("depends_on") or {}
        if isinstance(deps, dict):
            for target, spec in deps.items():
                assert isinstance(spec, dict) and "condition" in spec, (
                    f"{name} -> {target}: needs a condition"
                )
                assert not _unknown(spec, DEPENDS_ON_KEYS), (
                    f"{name} -> {target}: {_unknown(spec, DEPENDS_ON_KEYS)}"
                )
        for key in ("command", "entrypoint"):
            value = svc.get(key)
            assert value is None or isinstance(value, str) or all(isinstance(v, str) for v in value), (
                f"{name}: {key} items must be strings (quote numbers)"
            )


@pytest.mark.parametrize("name", TIDE_SERVICES)
def test_command_parses_with_tide_cli(name: str) -> None:
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1
    choices = subparsers[0].choices
    cmd = _command(SERVICES[name])
    assert cmd[0] in choices, f"{name}: `{cmd[0]}` is not a tide subcommand ({sorted(choices)})"
    try:
        args = parser.parse_args(cmd)
    except SystemExit as exc:
        pytest.fail(f"{name}: `tide {' '.join(cmd)}` does not parse (exit {exc.code})")
    assert args.command == cmd[0]


@pytest.mark.parametrize("name", TIDE_SERVICES)
def test_tide_variables_are_settings_of_the_service(name: str) -> None:
    known = {ENV_PREFIX + f.upper(): cls for cls in SETTINGS_CLASSES.values() for f in cls.model_fields}
    env = _service_env(name)
    unknown = sorted(k for k in env if k not in known)
    assert not unknown, f"{name}: no settings class has {unknown} (a typo, or a setting that was renamed)"
    cls = _settings_class(_command(SERVICES[name])[0])
    own = {ENV_PREFIX + f.upper() for f in cls.model_fields}
    ignored = sorted(k for k in env if k not in own)
    assert not ignored, f"{name}: {cls.__name__} ignores {ignored}; they have no effect on this service"


@pytest.mark.parametrize("name", TIDE_SERVICES)
def test_tide_variables_validate(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _effective_settings(name, monkeypatch, tmp_path)
    for key, value in _service_env(name).items():
        field = key.removeprefix(ENV_PREFIX).lower()
        got = getattr(settings, field)
        assert str(got) == value or str(got) == str(type(got)(value)), (
            f"{name}: {key}={value!r} read as {got!r}"
        )


@pytest.mark.parametrize("name", TIDE_SERVICES)
def test_kafka_bootstrap_names_the_broker(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _effective_settings(name, monkeypatch, tmp_path)
    kafka_name, kafka_env = _kafka_service()
    controllers = set(kafka_env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "").split(","))
    listeners = _listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = _listeners(kafka_env.get("KAFKA_ADVERTISED_LISTENERS", kafka_env["KAFKA_LISTENERS"]))
    hostnames = {kafka_name, SERVICES[kafka_name].get("hostname", kafka_name)}
    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        assert host in hostnames, f"{name}: TIDE_KAFKA_BOOTSTRAP host {host!r} is not the kafka service"
        matching = [ln for ln, (h, p) in advertised.items() if p == int(port) and h in hostnames]
        assert matching, f"{name}: {address} is not an advertised listener of {kafka_name} ({advertised})"
        assert not set(matching) & controllers, f"{name}: {address} is the controller listener"
        assert all(listeners[ln][1] == int(port) for ln in matching), f"{name}: nothing listens on {address}"


@pytest.mark.parametrize("name", TIDE_SERVICES)
def test_redis_url_names_the_redis_service(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _effective_settings(name, monkeypatch, tmp_path)
    redis_services = {n: s for n, s in SERVICES.items() if str(s.get("image", "")).startswith("redis:")}
    assert len(redis_services) == 1, f"expected one redis service, found {sorted(redis_services)}"
    ((redis_name, redis_svc),) = redis_services.items()
    cmd = redis_svc.get("command") or []
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else 6379
    url = urlsplit(settings.redis_url)
    assert url.scheme == "redis", f"{name}: {settings.redis_url}"
    assert url.hostname in {redis_name, redis_svc.get("hostname", redis_name)}, (
        f"{name}: {settings.redis_url}"
    )
    assert (url.port or 6379) == port == 6379, f"{name}: {settings.redis_url} (redis listens on {port})"


def test_services_agree_on_shared_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Topics created under one prefix and consumed under another would leave the processors idle."""
    seen: dict[str, dict[str, Any]] = {}
    for name in TIDE_SERVICES:
        with monkeypatch.context() as mp:
            s = _effective_settings(name, mp, tmp_path)
            seen[name] = {
                f: getattr(s, f) for f in ("kafka_bootstrap", "redis_url", "topic_prefix", "project")
            }
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in seen.values()}
    assert len(distinct) == 1, f"Tide services disagree: {seen}"


@pytest.mark.parametrize("name", sorted(set(TIDE_SERVICES) & set(LONG_RUNNING)))
def test_session_timeout_is_the_production_value(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _effective_settings(name, monkeypatch, tmp_path)
    embedded_default = CommonSettings.model_fields["kafka_session_timeout_ms"].default
    _, kafka_env = _kafka_service()
    low = int(kafka_env.get("KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS", 6000))
    high = int(kafka_env.get("KAFKA_GROUP_MAX_SESSION_TIMEOUT_MS", 1_800_000))
    assert settings.kafka_session_timeout_ms > embedded_default, (
        f"{name} keeps the embedded profile's timeout"
    )
    assert low <= settings.kafka_session_timeout_ms <= high, f"{name}: the broker would refuse the group join"


def test_serve_port_host_and_health_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    serving = [n for n in TIDE_SERVICES if _command(SERVICES[n])[0] == "serve"]
    assert serving, "no service runs `tide serve`"
    expose = [ins for ins in _tide_dockerfile_instructions() if ins[0] == "EXPOSE"]
    exposed = {int(p.split("/")[0]) for _, args in expose for p in args.split()}
    for name in serving:
        with monkeypatch.context() as mp:
            settings = _effective_settings(name, mp, tmp_path)
        assert settings.serve_host in {"0.0.0.0", "::"}, (
            f"{name}: TIDE_SERVE_HOST={settings.serve_host} is unreachable from outside the container"
        )
        ports = _ports(SERVICES[name])
        assert ports, f"{name}: the scoring port is not published"
        assert {p[2] for p in ports} == {settings.serve_port}, (
            f"{name}: published {ports}, serves {settings.serve_port}"
        )
        assert settings.serve_port in exposed, (
            f"the Dockerfile EXPOSEs {exposed}, serve listens on {settings.serve_port}"
        )
        test = _healthcheck_test(SERVICES[name])
        assert test, f"{name} has no healthcheck"
        m = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/readyz", test)
        assert m and int(m.group(1)) == settings.serve_port, f"{name}: healthcheck must GET /readyz: {test}"
        assert "curl" not in test and "wget" not in test, "python:3.11-slim has neither curl nor wget"


def test_processor_metrics_are_scrapable_in_the_network_and_health_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in TIDE_SERVICES:
        if _command(SERVICES[name])[0] not in ("features", "train", "drift", "judge"):
            continue
        with monkeypatch.context() as mp:
            settings = _effective_settings(name, mp, tmp_path)
        port = settings.metrics_port
        assert port is not None, f"{name}: no TIDE_METRICS_PORT, so no metrics and no health endpoint"
        assert settings.metrics_host == "0.0.0.0", (
            f"{name}: metrics on {settings.metrics_host} are unreachable"
        )
        assert port not in {p[2] for p in _ports(SERVICES[name])}, f"{name}: metrics port {port} is published"
        test = _healthcheck_test(SERVICES[name])
        assert test and f":{port}/metrics" in test, (
            f"{name}: healthcheck does not poll its metrics port {port}"
        )


def test_no_port_published_beyond_localhost() -> None:
    for name, svc in SERVICES.items():
        for host_ip, _, container_port in _ports(svc):
            assert host_ip == "127.0.0.1", (
                f"{name}: port {container_port} is published on {host_ip or 'every interface'}, not 127.0.0.1"
            )


def test_depends_on_targets_exist_and_are_acyclic() -> None:
    graph: dict[str, set[str]] = {}
    for name, svc in SERVICES.items():
        deps = _depends_on(svc)
        for target, condition in deps.items():
            assert target in SERVICES, f"{name} depends on {target!r}, which is not a service"
            assert condition in DEPENDS_CONDITIONS, f"{name} -> {target}: unknown condition {condition!r}"
            if condition == HEALTHY:
                assert _healthcheck_test(SERVICES[target]), (
                    f"{name} waits for {target} healthy: it has no healthcheck"
                )
            if condition == COMPLETED:
                assert not SERVICES[target].get("restart"), f"{name} waits for {target} to exit: it restarts"
        graph[name] = set(deps)
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"depends_on cycle: {' -> '.join((*path, node))}"
        if node not in done:
            for nxt in graph[node]:
                visit(nxt, (*path, node))
            done.add(node)

    for name in graph:
        visit(name, ())


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_restart_and_report_health(name: str) -> None:
    svc = SERVICES[name]
    assert svc.get("restart") in LONG_RUNNING_RESTART, (
        f"{name}: restart: unless-stopped (got {svc.get('restart')!r})"
    )
    deps = _depends_on(svc)
    waits_for_healthy = any(c == HEALTHY for c in deps.values())
    assert _healthcheck_test(svc) or waits_for_healthy, f"{name}: no healthcheck and no healthy dependency"
    if _is_tide(svc):
        for infra_name in (_kafka_service()[0], "redis"):
            assert deps.get(infra_name) == HEALTHY, f"{name} must wait for {infra_name} healthy"


def test_topics_are_created_and_definitions_applied_before_the_processors() -> None:
    creators = [n for n in TIDE_SERVICES if _command(SERVICES[n])[0] == "apply"]
    assert len(creators) == 1, f"exactly one service must run `tide apply`, found {creators}"
    creator = creators[0]
    svc = SERVICES[creator]
    assert not svc.get("restart"), f"{creator} is one-shot: a restart policy would run it forever"
    kafka_name, kafka_env = _kafka_service()
    assert _depends_on(svc).get(kafka_name) == HEALTHY, f"{creator} must wait for {kafka_name} healthy"
    assert kafka_env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "false", (
        "topics must come from `tide apply` only"
    )
    args = build_parser().parse_args(_command(svc))
    brokers = 1  # one KRaft node; a multi-broker stack raises this together with the replication factors
    assert args.replication_factor <= brokers, (
        f"replication factor {args.replication_factor} > {brokers} broker(s)"
    )
    for name in TIDE_SERVICES:
        if _command(SERVICES[name])[0] in PROCESSOR_COMMANDS:
            assert _depends_on(SERVICES[name]).get(creator) == COMPLETED, (
                f"{name} must start after {creator} has exited 0 (depends_on condition {COMPLETED})"
            )


def test_kafka_is_a_single_kraft_node() -> None:
    kafka_name, env = _kafka_service()
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners, f"controller listener {controller} is not in KAFKA_LISTENERS"
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{node_id}@{kafka_name}:{listeners[controller][1]}"], f"quorum voters {voters}"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env.get(key) == "1", f"{key} must be 1 on one broker (transactions fail otherwise)"
    log_dirs = env.get("KAFKA_LOG_DIRS", "")
    mounts = [str(v).split(":")[1] for v in SERVICES[kafka_name].get("volumes") or [] if isinstance(v, str)]
    assert log_dirs in mounts, f"KAFKA_LOG_DIRS={log_dirs!r} is not on a volume ({mounts})"
    test = _healthcheck_test(SERVICES[kafka_name]) or ""
    assert "kafka-broker-api-versions.sh" in test, "kafka healthcheck"
    m = re.search(r"--bootstrap-server (?:localhost|127\.0\.0\.1):(\d+)", test)
    assert m and int(m.group(1)) in {p for ln, (_, p) in listeners.items() if ln != controller}


def test_images_are_pinned() -> None:
    version = PYPROJECT["project"]["version"]
    for name, svc in SERVICES.items():
        image = svc.get("image")
        assert image or "build" in svc, f"{name}: no image and no build"
        if not image:
            continue
        ref = _interpolate(str(image)).split("@", 1)[0]
        _, sep, tag = ref.rpartition(":")
        assert sep and "/" not in tag, f"{name}: image {image} has no tag"
        assert tag != "latest", f"{name}: image {image} is not pinned"
        if _is_tide(svc):
            assert tag == version, f"{name}: image {image}; the package is {version}"
        else:
            assert re.match(r"\d", tag), f"{name}: pin {image} to a version"


# --- the image -------------------------------------------------------------------------------------------


def test_dockerfile_builds_the_package() -> None:
    instructions = _tide_dockerfile_instructions()
    final = _final_stage(instructions)
    stage_names = {
        m.group(1) for ins, a in instructions if ins == "FROM" and (m := re.search(r" AS (\S+)", a, re.I))
    }
    for ins, args in instructions:
        if ins == "FROM":
            base = args.split()[0]
            assert base in stage_names or base.startswith("python:3.11-slim"), f"base image {base}"
    entrypoints = [a for i, a in final if i == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["tide"], (
        f'ENTRYPOINT must be ["tide"]: {entrypoints}'
    )
    assert "tide" in PYPROJECT["project"]["scripts"], "pyproject.toml no longer installs the `tide` script"
    assert not [i for i, _ in instructions if i == "HEALTHCHECK"], "health checks belong to compose"
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, (
        f"the image must run as a non-root USER: {users}"
    )

    runs = [a for i, a in instructions if i == "RUN"]
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\s*==", d)).replace(
        " ", ""
    )
    torch_runs = [i for i, r in enumerate(runs) if "pip install" in r and torch_pin in r.split()]
    assert torch_runs, f"the image must install {torch_pin} (pyproject.toml's pin)"
    assert "https://download.pytorch.org/whl/cpu" in runs[torch_runs[0]], "torch must come from the CPU index"
    package_runs = [
        i for i, r in enumerate(runs) if "pip install" in r and re.search(r"""['"]?\.\[cpu\]['"]?""", r)
    ]
    assert package_runs, "the image must `pip install .[cpu]`"
    assert torch_runs[0] < package_runs[0], (
        "install CPU torch before the package, or pip fetches the CUDA build"
    )
    assert "onnxruntime" in " ".join(PYPROJECT["project"]["optional-dependencies"]["cpu"])

    # The image resolves to the versions CI tests: requirements.lock constrains every install that resolves.
    lock = dict(
        line.split("==", 1) for line in LOCK_FILE.read_text().splitlines() if "==" in line and line[0] != "#"
    )
    torch_version = torch_pin.split("==", 1)[1]
    assert lock.get("torch", "").split("+")[0] == torch_version, (
        f"requirements.lock pins torch {lock.get('torch')}"
    )
    for r in runs:
        if "pip install" in r and "--no-deps" not in r:
            assert f"-c {LOCK_FILE.name}" in r, f"install without the lock's constraints: {r}"


def test_dockerfile_copies_what_the_context_has() -> None:
    rules = _dockerignore_rules()
    for ins, args in _tide_dockerfile_instructions():
        if ins != "COPY" or "--from=" in args:
            continue
        *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for source in sources:
            if source in {".", "./"}:
                continue
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not _dockerignored(source.strip("/"), rules), f"COPY {source}: .dockerignore drops it"


def test_dockerfile_exposes_no_unknown_tide_variables() -> None:
    known = {ENV_PREFIX + f.upper() for f in CommonSettings.model_fields}
    env = _dockerfile_env(_tide_dockerfile_instructions())
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    assert not unknown, f"the image sets {unknown}, which not every service reads"


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    assert DOCKERIGNORE.is_file(), (
        "the build context is the repository root: it needs a top-level .dockerignore"
    )
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _ignore_regex(line.lstrip("!").strip("/"))))
    return rules


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    rules = _dockerignore_rules()
    packages = sorted(
        p.name
        for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
        for p in ROOT.glob(pattern)
        if (p / "__init__.py").is_file()
    )
    assert packages
    needed = ["pyproject.toml", *(f"{p}/__init__.py" for p in packages), "schemas/avro/fingerprints.json"]
    readme = PYPROJECT["project"].get("readme")
    if isinstance(readme, str):  # setuptools reads it while building the wheel
        needed.append(readme)
    for path in needed:
        assert not _dockerignored(path, rules), f".dockerignore drops {path}, which `pip install .` needs"
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".tide/stack.json",
        "out/demo/report.json",
        "tests/unit/test_compose.py",
        "serving/__pycache__/app.cpython-311.pyc",
        "tide_ml.egg-info/PKG-INFO",
    ):
        assert _dockerignored(path, rules), f".dockerignore lets {path} into the build context"
