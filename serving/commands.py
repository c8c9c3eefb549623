"""``tide serve``, ``tide deploy`` and ``tide keys``: the scoring service and its traffic policy."""

from __future__ import annotations

import argparse

from infra.console import AddCommand, emit, run_service
from infra.errors import ConfigError
from infra.settings import CommonSettings, load


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import run
    from serving.settings import ServeSettings

    return run_service(ServeSettings, run)


def cmd_deploy(args: argparse.Namespace) -> int:
    from schemas.registry import load as load_definitions
    from serving.deployments import deployment_record, publish_deployment

    settings = load(CommonSettings)
    models = sorted(load_definitions(settings).project.models)
    model = args.model
    if model is None:
        if len(models) != 1:
            raise ConfigError(f"--model is required: the project has models {', '.join(models) or 'none'}")
        model = models[0]
    elif model not in models:
        raise ConfigError(
            f"--model {model!r} is not a model of the project (models: {', '.join(models) or 'none'})"
        )
    record = deployment_record(model, args.action, args.version, args.weight, args.reason, source="cli")
    publish_deployment(settings, record)
    emit(record)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from serving.auth import new_key

    key, entry = new_key(args.name, [r.strip() for r in args.roles.split(",") if r.strip()])
    emit({"key": key, "entry": entry.model_dump(mode="json")})
    return 0


def add_commands(add: AddCommand) -> None:
    add(
        "serve",
        cmd_serve,
        "Run the HTTP scoring service for every model of the applied definitions "
        "(POST /v1/models/{name}/score); follows the registry (models applied, changed or removed while it "
        "runs) and the models topic, and hot-swaps versions.",
    )
    dp = add(
        "deploy",
        cmd_deploy,
        "Change which model version serves: promote VERSION to champion, canary VERSION --weight W "
        "(sticky per entity; weight 0 ends it), shadow VERSION (mirrored and logged; no version ends it), "
        "rollback (to the previous champion, or VERSION), follow (the newest version serves). Published "
        "to the deployments topic; every serving node applies it.",
    )
    dp.add_argument("action", choices=("promote", "canary", "shadow", "rollback", "follow"))
    dp.add_argument("version", nargs="?", type=int, default=None, help="model version the action applies to")
    dp.add_argument("--weight", type=float, default=0.0, help="canary share of entities in [0, 1]")
    dp.add_argument("--model", default=None, help="model name (required when the project has several models)")
    dp.add_argument("--reason", default=None, help="why, kept with the record")
    ke = add(
        "keys",
        cmd_keys,
        "`keys new`: make an API key for `tide serve`. Prints the key (shown once, never stored) and the "
        "entry to add to TIDE_SERVE_API_KEYS or the TIDE_SERVE_API_KEYS_FILE list (only its sha256).",
    )
    ke.add_argument("action", choices=("new",))
    ke.add_argument("--name", required=True, help="the key's name, for logs (e.g. the client's)")
    ke.add_argument("--roles", default="score", help="comma-separated: score, admin (default score)")
