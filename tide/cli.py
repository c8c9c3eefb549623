"""``tide``: one command line assembled from each package's ``commands.py``.

Each subcommand builds its service's settings from ``TIDE_*`` variables (failing with the key's name on a
bad value), configures logging once and hands over to the package that owns the work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from features import commands as features_commands
from infra.console import Handler
from infra.errors import TideError
from online_training import commands as training_commands
from serving import commands as serving_commands
from streams import commands as streams_commands
from tide import commands as tide_commands
from tide import models as models_commands

# In the order `tide --help` lists them.
PACKAGES = (
    tide_commands,
    streams_commands,
    features_commands,
    training_commands,
    serving_commands,
    models_commands,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tide",
        description="Tide: Kafka events to Redis features, online training, hot-swapped HTTP scoring and "
        "drift alerts, for the sources, features and models a project declares. Settings come from TIDE_* "
        "environment variables (TIDE_KAFKA_BOOTSTRAP, TIDE_REDIS_URL, TIDE_TOPIC_PREFIX, TIDE_PROJECT, ...); "
        "with `tide up` running, its addresses are the defaults.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Handler, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    for package in PACKAGES:
        package.add_commands(add)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except TideError as exc:
        field = getattr(exc, "field", None)  # request errors name their field apart from the message
        where = f"{field}: " if field else ""
        sys.stderr.write(f"tide {args.command}: error: {where}{exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
