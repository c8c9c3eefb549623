"""Batch retraining (``tide retrain``): every model with a batch trainer, trained on point-in-time rows and
published as ONNX.

One cycle per model (:func:`retrain_model`):

1. its examples (:func:`online_training.history.all_examples`): each labelled event of the request source
   with the model's inputs as serving saw them when it scored the event (request fields, and every
   feature as of just before the event, through the window code the online processor runs), each view
   at its newest live version (:func:`online_training.lineage.binding_of`; a model with a view not
   live yet waits);
2. split by event time: the newest ``retrain_holdout`` share is held out;
3. the model's batch trainer (``factory(n_inputs)``, a torch module; the contract is in
   :mod:`online_training.network`) trained for its task on the others, on CUDA when torch sees a GPU;
4. exported to ONNX and the held-out rows scored through :class:`models.runtime.OnnxRuntime`, the
   serving path; nothing is published unless those scores equal torch's to within 1e-5;
5. published as the next version of the model (flavor ``onnx``, after its newest version of any flavor)
   with its declared metric on the held-out rows and its lineage (the registry digest and the view
   versions it was trained with), unless no label arrived since its last ONNX version of the same
   inputs and view versions, or it does no better than guessing (binary: held-out ROC AUC under
   ``retrain_min_auc``; regression: held-out MAE not under that of predicting the training mean).

Every version records its lineage: parent (the champion when it started), trigger (``schedule`` or the
drift alert), data (the event-time range trained on) and its blessing
(:func:`online_training.blessing.compare`): the candidate against the champion (the model's newest
blessed version, any flavor, scored through serving's loader) on the newest ``policy.retrain.window``
held-out examples, which neither trained on when the champion is an older batch version. An unblessed
version is published with the reason; serving never makes it champion.

A periodic run (``--every``) also reads the ``drift-alerts`` topic (group ``retrain_group``): an alert
of a kind a batch model's ``policy.retrain.on`` lists retrains that model at once (even without new
labels; on the newest ``retrain_triggered_labels`` training examples only, when set), at most once
per ``min_interval_s`` and once per alert (:mod:`online_training.triggers`; the
alert's offset is committed after its cycle, and an alert a published version already names is not
acted on again).

``tide retrain --every`` follows the registry while it runs (:class:`schemas.registry.Follower`, polled
every second between cycles): a model added (or changed) is retrained at once, a removed one no more,
and a model whose views get a newer live version is retrained on it at once, so the older view
version can be retired.

Inputs must be numeric or boolean: the ONNX runtime feeds a model one float32 row, and a string has no
float value there. A model with a string input (request field or ``last`` feature) is refused before
anything is trained, with an error naming the model and the input; encode such an input as a number in
the source, or give the model a river learner, whose pipeline can one-hot it. Multiclass batch training
is not supported yet (refused the same way).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import torch
from torch import nn

from features.training import Example
from features.versions import read_states
from infra.errors import TrainingError
from infra.imports import add_code_path, import_object
from models.base import Output
from models.inputs import ModelInputs
from models.profile import build_profile
from models.runtime import OnnxRuntime, feature_matrix
from online_training.blessing import ChampionScorer, as_prediction, compare
from online_training.evaluation import build_metric, rolling_auc
from online_training.history import all_examples
from online_training.lineage import Binding, binding_of, waiting_views
from online_training.network import check_parity, export_onnx, fit_network, pick_device, train_mlp
from online_training.publish import newest_versions, publish_model_version, signer_of
from online_training.settings import RetrainSettings
from online_training.triggers import SCHEDULE, AlertReader, Known, trigger_of
from schemas import registry
from schemas.definitions import Model, Project
from schemas.records import Blessing

__all__ = [
    "Candidate",
    "batch_models",
    "check_model",
    "export_onnx",  # from online_training.network, as before it moved there
    "fit",
    "retrain",
    "retrain_model",
    "run",
    "split_by_time",
    "train_mlp",  # likewise
]

log = logging.getLogger(__name__)

FLAVOR = "onnx"
POLL_S = 1.0  # how often a periodic run looks for new definitions and live view versions


def batch_models(project: Project) -> list[Model]:
    """The models ``tide retrain`` trains: those with a batch trainer (and so labels), by name."""
    return [
        m for _, m in sorted(project.models.items()) if m.batch_trainer is not None and m.labels is not None
    ]


def check_model(project: Project, model: Model, versions: Mapping[str, int] | None = None) -> None:
    """:class:`TrainingError` naming the model and input when it cannot be batch-trained (see the module
    docstring); ``versions``: the view versions it would read (default the newest)."""
    if model.task not in ("binary", "regression"):
        raise TrainingError(
            f"model {model.name!r}: batch training supports binary and regression tasks, not {model.task}"
        )
    strings = ModelInputs.of(project, model, versions).strings(model.input_names)
    if strings:
        raise TrainingError(
            f"model {model.name!r}, input {strings[0]!r}: string inputs cannot be batch-trained (ONNX models "
            f"take numeric and boolean inputs only); encode it as a number, or learn it with a river learner"
        )


def split_by_time(examples: Sequence[Example], holdout: float) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: the newest ``holdout`` share (by event time, ties by key) is held out."""
    ordered = sorted(examples, key=lambda e: (e.ts, str(e.key)))
    cut = len(ordered) - max(1, int(len(ordered) * holdout))
    return ordered[:cut], ordered[cut:]


def targets(examples: Sequence[Example]) -> np.ndarray:
    return np.array([float(e.y) for e in examples], dtype=np.float32)


@dataclass(frozen=True)
class Candidate:
    """A trained module, its ONNX artifact and how they did on the held-out rows."""

    module: nn.Module
    artifact: bytes
    scores: list[float]  # onnxruntime's, per held-out row
    metric_value: float | None  # the model's declared metric
    roc_auc: float | None  # binary only
    baseline_mae: float | None  # regression only: predicting the training mean
    mae: float | None
    max_abs_diff: float  # onnxruntime vs torch on the held-out rows
    device: str


def _declared_metric(model: Model, held_out: Sequence[Example], scores: Sequence[float]) -> float | None:
    metric = build_metric(model)
    labels_only = getattr(metric, "requires_labels", False)
    for example, score in zip(held_out, scores, strict=True):
        if model.task == "binary":
            y_pred: Any = score >= 0.5 if labels_only else {True: score, False: 1.0 - score}
        else:
            y_pred = score
        metric.update(y_true=example.y, y_pred=y_pred)
    value = metric.get()
    return None if value is None else float(value)


def fit(
    settings: RetrainSettings, model: Model, train: Sequence[Example], held_out: Sequence[Example]
) -> Candidate:
    """Train the model's batch trainer on ``train``, export it, check ONNX against torch and evaluate it on
    ``held_out`` (nothing is published)."""
    assert model.batch_trainer is not None
    names = model.input_names
    factory = import_object(model.batch_trainer, f"model {model.name!r}, field 'batch_trainer'")
    torch.manual_seed(settings.retrain_seed)  # the factory's initial weights
    try:
        module = factory(len(names))
    except Exception as exc:
        raise TrainingError(
            f"model {model.name!r}: {model.batch_trainer}({len(names)}) raised {exc!r}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise TrainingError(
            f"model {model.name!r}: {model.batch_trainer}({len(names)}) returned {type(module).__name__}, "
            "not a torch.nn.Module"
        )
    device = pick_device(settings.retrain_device)
    scored = fit_network(
        module,
        feature_matrix([e.x for e in train], names),
        targets(train),
        model.task,
        epochs=settings.retrain_epochs,
        device=device,
        seed=settings.retrain_seed,
        batch_size=settings.retrain_batch_size,
        lr=settings.retrain_lr,
    )
    artifact = export_onnx(scored, names)
    runtime = OnnxRuntime(artifact, names, task=model.task)
    rows = [e.x for e in held_out]
    diff = check_parity(runtime, scored, rows)
    scores = [o.score for o in runtime.predict_many(rows)]
    ys = [e.y for e in held_out]
    auc = mae = baseline = None
    if model.task == "binary":
        auc = rolling_auc([bool(y) for y in ys], scores)
    else:
        mean = float(np.mean([float(e.y) for e in train]))
        mae = float(np.mean([abs(float(y) - s) for y, s in zip(ys, scores, strict=True)]))
        baseline = float(np.mean([abs(float(y) - mean) for y in ys]))
    return Candidate(
        scored,
        artifact,
        scores,
        _declared_metric(model, held_out, scores),
        auc,
        baseline,
        mae,
        diff,
        device.type,
    )


def _refusal(settings: RetrainSettings, candidate: Candidate) -> str | None:
    if candidate.roc_auc is not None or candidate.mae is None:
        auc = candidate.roc_auc
        if auc is None or auc < settings.retrain_min_auc:
            return f"held-out ROC AUC {auc} is under {settings.retrain_min_auc}"
        return None
    if candidate.baseline_mae is not None and not candidate.mae < candidate.baseline_mae:
        return (
            f"held-out MAE {candidate.mae:.4g} is not under {candidate.baseline_mae:.4g}, the training mean's"
        )
    return None


def _bless(
    project: Project, model: Model, held_out: Sequence[Example], scores: Sequence[float], champion: Any
) -> Blessing:
    """The candidate against ``champion`` (a record, or None) on the newest ``policy.retrain.window``
    held-out examples (module docstring)."""
    n = min(model.policy.retrain.window, len(held_out))
    window = held_out[len(held_out) - n :]
    labels_only = bool(getattr(build_metric(model), "requires_labels", False))
    ours = [as_prediction(model.task, Output(s), labels_only) for s in scores[len(scores) - n :]]
    ys = [e.y for e in window]
    if champion is None:
        return compare(model, ys, ours)
    theirs = ChampionScorer().predictions(project, model, champion, [e.x for e in window])
    return compare(model, ys, ours, theirs, int(champion["version"]))


def retrain_model(
    settings: RetrainSettings,
    project: Project,
    model: Model,
    newest: dict[str, dict[str, Any]] | None = None,
    *,
    binding: Binding | None = None,
    digest: str | None = None,
    trigger: str = SCHEDULE,
    known: Known | None = None,
) -> dict[str, Any]:
    """One cycle for ``model`` (module docstring); returns a summary, ``published`` saying whether it did.
    ``newest``: the newest version of each model (any flavor), if already read (``known``: that and the
    champions, if read); ``binding``: the view versions to train on (default: the newest live ones,
    read from Redis); ``digest``: of the registry definitions being run (default: ``project``'s);
    ``trigger``: ``schedule`` or the drift alert it answers (then it is retrained even without new
    labels)."""
    started = time.perf_counter()
    if binding is None:
        binding, waiting = _bind(settings, project, model)
        if binding is None:
            return {"model": model.name, "labels": 0, "published": False, "reason": waiting}
    check_model(project, model, binding.view_versions)
    examples = all_examples(settings, project, model, binding.views)
    summary: dict[str, Any] = {
        "model": model.name,
        "labels": len(examples),
        "published": False,
        "view_versions": binding.view_versions,
    }
    if len(examples) < settings.retrain_min_labels:
        return {**summary, "reason": f"{len(examples)} labels, fewer than {settings.retrain_min_labels}"}
    train, held_out = split_by_time(examples, settings.retrain_holdout)
    if trigger != SCHEDULE and settings.retrain_triggered_labels:
        # After a drift alert, the newest labels describe the world to come: train on those only.
        train = train[-settings.retrain_triggered_labels :]
    latest_onnx = newest_versions(settings, FLAVOR).get(model.name)
    if (
        trigger == SCHEDULE
        and latest_onnx is not None
        and latest_onnx["trained_on"] == len(train)
        and binding.serves(latest_onnx["feature_names"], latest_onnx.get("view_versions") or {})
    ):
        return {
            **summary,
            "version": latest_onnx["version"],
            "reason": "no new labels since the last version",
        }
    if model.task == "binary" and (len({e.y for e in train}) < 2 or len({e.y for e in held_out}) < 2):
        return {**summary, "reason": "the training or held-out split has only one class"}
    candidate = fit(settings, model, train, held_out)
    summary.update(
        train=len(train),
        held_out=len(held_out),
        metric_name=model.metric_name,
        metric_value=candidate.metric_value,
        device=candidate.device,
        max_abs_diff=candidate.max_abs_diff,
        artifact_bytes=len(candidate.artifact),
    )
    if model.task == "binary":
        summary["roc_auc"] = candidate.roc_auc
    else:
        summary.update(mae=candidate.mae, baseline_mae=candidate.baseline_mae)
    refused = _refusal(settings, candidate)
    if refused:
        return {**summary, "reason": refused}
    known = known if known is not None else Known.read(settings)
    newest = newest if newest is not None else known.newest
    latest = newest.get(model.name)
    version = (latest["version"] if latest else 0) + 1
    champion = known.champions.of(model.name)
    blessing = _bless(project, model, held_out, candidate.scores, champion)
    record = publish_model_version(
        settings,
        model=model.name,
        version=version,
        flavor=FLAVOR,
        artifact=candidate.artifact,
        feature_names=model.input_names,
        metric_name=model.metric_name,
        metric_value=candidate.metric_value,
        trained_on=len(train),
        reference=build_profile([e.x for e in held_out], candidate.scores, model.monitor),
        task=model.task,
        definitions_digest=digest or project.digest(),
        view_versions=binding.view_versions,
        parent_version=None if champion is None else int(champion["version"]),
        trigger=trigger,
        data={"first_ts": train[0].ts, "last_ts": train[-1].ts},
        blessing=blessing,
    )
    known.seen(record)
    return {
        **summary,
        "published": True,
        "version": version,
        "trigger": trigger,
        "parent_version": record["parent_version"],
        "blessed": blessing["blessed"],
        "blessing": blessing["reason"],
        "artifact_uri": record["artifact_uri"],
        "signed_by": record["key_id"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _bind(settings: RetrainSettings, project: Project, model: Model) -> tuple[Binding | None, str]:
    """``model`` bound to its views' newest live versions, or None and why it waits."""
    if not model.feature_refs:
        return binding_of(project, model, {}), ""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        states = read_states(client, settings.topic_prefix)
    finally:
        client.close()
    binding = binding_of(project, model, states)
    if binding is not None:
        return binding, ""
    views = ", ".join(waiting_views(project, model, states))
    return None, f"waiting for a live version of view(s) {views}"


def retrain(
    settings: RetrainSettings, project: Project, *, digest: str | None = None
) -> list[dict[str, Any]]:
    """One cycle for every model with a batch trainer; one summary each."""
    known = Known.read(settings)
    return [
        retrain_model(settings, project, model, digest=digest, known=known) for model in batch_models(project)
    ]


def run(
    settings: RetrainSettings,
    project: Project,
    *,
    every_s: float | None = None,
    stop: threading.Event | None = None,
    on_result: Callable[[dict[str, Any]], None] = lambda _: None,
    follow: bool | None = None,
) -> None:
    """Retrain every batch model once, or every ``every_s`` seconds until ``stop`` is set. A model that
    cannot be batch-trained fails at once; a failed cycle of a periodic run is logged and the next one
    runs (a single run raises). ``follow`` (default: for a periodic run) follows the registry: see the
    module docstring."""
    stop = stop or threading.Event()
    add_code_path(settings.project)
    signer_of(settings)  # a bad signing key fails now
    follower = registry.Follower(settings) if (every_s is not None if follow is None else follow) else None
    digest = project.digest()
    if follower is not None:
        project, digest = follower.current.project, follower.current.digest
    for model in batch_models(project):
        check_model(project, model)
    if not batch_models(project):
        log.warning("project %s has no model with a batch trainer: nothing to retrain", project.name)
    schedule = _Schedule()
    alerts = AlertReader(settings, settings.retrain_group) if every_s is not None else None
    try:
        while not stop.is_set():
            if follower is not None and (found := follower.poll()) is not None:
                project, digest = found.project, found.digest
                log.info("retraining with definitions version %d (%s)", found.version, digest[:12])
            due = [(m, b, SCHEDULE) for m, b in schedule.due(settings, project, every_s)]
            known = Known.read(settings) if due or alerts is not None else None
            if alerts is not None and known is not None:
                # An alert's retraining replaces the scheduled one of the same model.
                triggered = _triggered(settings, project, alerts.poll(), known)
                names = {m.name for m, _, _ in triggered}
                due = [d for d in due if d[0].name not in names] + triggered
            for model, binding, trigger in due:
                assert known is not None
                result = _cycle(settings, project, model, binding, known, digest, every_s, trigger)
                if result is not None:
                    schedule.done(model, binding, result)
                    log.info("retrain %s", json.dumps(result, default=str))
                    on_result(result)
            if alerts is not None:
                alerts.commit()  # what they triggered is published (or refused, and logged)
            if every_s is None:
                return
            stop.wait(POLL_S if follower is not None or alerts is not None else every_s)
    finally:
        if follower is not None:
            follower.close()
        if alerts is not None:
            alerts.close()


def _triggered(
    settings: RetrainSettings,
    project: Project,
    alerts: Sequence[Mapping[str, Any]],
    known: Known,
) -> list[tuple[Model, Binding | None, str]]:
    """The batch models to retrain now on ``alerts`` (policy, dedupe and rate limit: :class:`Triggers`)."""
    out: list[tuple[Model, Binding | None, str]] = []
    models = {m.name: m for m in batch_models(project)}
    for alert in alerts:
        model = models.get(str(alert.get("model")))
        if model is None or not known.triggers.wanted(model, alert, int(time.time() * 1000)):
            continue
        known.triggers.acting(model.name, alert, int(time.time() * 1000))
        binding, _ = _bind(settings, project, model)
        out.append((model, binding, trigger_of(alert)))
    return out


def _cycle(
    settings: RetrainSettings,
    project: Project,
    model: Model,
    binding: Binding | None,
    known: Known,
    digest: str,
    every_s: float | None,
    trigger: str = SCHEDULE,
) -> dict[str, Any] | None:
    if binding is None:
        return {
            "model": model.name,
            "labels": 0,
            "published": False,
            "reason": _bind(settings, project, model)[1],
        }
    try:
        return retrain_model(
            settings, project, model, binding=binding, digest=digest, trigger=trigger, known=known
        )
    except Exception:
        if every_s is None:
            raise
        # The next cycle may well succeed (a broker back from a restart): log, wait, go on.
        log.exception("retraining %s failed; next try in %.0f s", model.name, every_s)
        return None


@dataclass
class _Schedule:
    """When each batch model is retrained next: every ``every_s``, and at once when it is new, its
    definition changed or its views got a newer live version (its binding changed)."""

    next_at: dict[str, float] = field(default_factory=dict)  # model -> monotonic time
    trained: dict[str, str] = field(default_factory=dict)  # model -> fingerprint of its last cycle
    waiting: set[str] = field(default_factory=set)

    def due(
        self, settings: RetrainSettings, project: Project, every_s: float | None
    ) -> list[tuple[Model, Binding | None]]:
        models = batch_models(project)
        names = {m.name for m in models}
        for gone in set(self.next_at) - names:
            del self.next_at[gone]
            self.trained.pop(gone, None)
            log.info("model %s is no longer a model with a batch trainer: not retrained any more", gone)
        now = time.monotonic()
        states = _states(settings) if any(m.feature_refs for m in models) else {}
        out: list[tuple[Model, Binding | None]] = []
        for model in models:
            binding = binding_of(project, model, states)
            if binding is None:
                if model.name not in self.waiting:  # reported once, then looked at again each poll
                    self.waiting.add(model.name)
                    out.append((model, None))
                continue
            self.waiting.discard(model.name)
            changed = self.trained.get(model.name) != binding.fingerprint
            if changed or now >= self.next_at.get(model.name, 0.0):
                if changed and model.name in self.trained:
                    log.info("model %s: retrained now on %s", model.name, binding.describe())
                try:
                    check_model(project, model, binding.view_versions)
                except TrainingError as exc:
                    if every_s is None:
                        raise
                    log.error("%s; not retrained", exc)
                    self.trained[model.name] = binding.fingerprint
                    self.next_at[model.name] = float("inf")
                    continue
                out.append((model, binding))
                self.next_at[model.name] = now + (every_s or 0.0)
        return out

    def done(self, model: Model, binding: Binding | None, result: Mapping[str, Any]) -> None:
        if binding is not None:
            self.trained[model.name] = binding.fingerprint


def _states(settings: RetrainSettings) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return dict(read_states(client, settings.topic_prefix))
    finally:
        client.close()
