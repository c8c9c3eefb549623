"""Shared fixtures: one embedded stack (real tansu broker + Redis) per test session, and unique names."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import CommonSettings
from schemas.definitions import Project
from tide.embedded import EmbeddedStack, StackInfo
from tide.project import load_project

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A running embedded stack on free 127.0.0.1 ports, stopped when the session ends."""
    with EmbeddedStack(tmp_path_factory.mktemp("stack")) as info:
        yield info


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to the test, so tests sharing the session's broker never see each other's topics."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def settings(stack: StackInfo, topic_prefix: str, tmp_path: pytest.TempPathFactory) -> CommonSettings:
    """Settings pointing at the session's stack, with this test's own topics (created) and state dir."""
    from infra.topics import ensure_topics

    s = stack.settings(topic_prefix=topic_prefix, state_dir=tmp_path)
    ensure_topics(s)
    return s


@pytest.fixture(scope="session")
def fraud_project() -> Project:
    """The fraud example's definitions, loaded from examples/fraud."""
    return load_project(EXAMPLES / "fraud")


@pytest.fixture
def fraud(settings: CommonSettings, fraud_project: Project) -> CommonSettings:
    """``settings`` with the fraud example applied: its topics exist, the registry holds its definitions
    and this process knows its sources' schemas (as every service does after ``schemas.registry.load``)."""
    from schemas.registry import register_schemas
    from tide.plan import apply

    s = settings.model_copy(update={"project": EXAMPLES / "fraud"})
    apply(s, fraud_project)
    register_schemas(fraud_project)
    return s
