"""Shared fixtures: one embedded stack (real tansu broker + Redis) per test session, and unique names."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from infra.embedded import EmbeddedStack, StackInfo
from infra.settings import CommonSettings


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
    from streams.topics import ensure_topics

    s = stack.settings(topic_prefix=topic_prefix, state_dir=tmp_path)
    ensure_topics(s)
    return s
