"""Tide's exception tree. Every error Tide raises on purpose derives from :class:`TideError`.

TideError
├── ConfigError            infra: a setting is missing or invalid (names the key)
├── StackError             infra: the embedded broker or Redis failed to start or stop
├── DefinitionError        schemas: a project definition is invalid (names file, object and field)
│   ├── UnknownViewVersion     a view version the registry no longer keeps (retired or never made)
│   ├── BreakingChange         apply without --allow-breaking: each breaking change named
│   └── RegistryConflict       another apply took the registry version first: plan again
├── SchemaError            schemas: a record does not match its Avro schema
│   └── UnknownSchemaError     the fingerprint in a record's header is not a known schema version
├── StreamError            streams: Kafka plumbing failed (admin, produce, consume)
├── FeatureError           features: a definition or an online-store read is invalid
├── TrainingError          online_training: a learner or model artifact could not be built
└── ServingError           serving: a model could not be loaded or a request not scored
    ├── ModelLoadError         an artifact failed to load or warm up; the old model stays
    │   ├── DigestMismatch         an artifact's bytes do not match its recorded sha256
    │   └── LineageMismatch        a version's view versions or inputs are not served by these definitions
    ├── RequestError           a scoring request is invalid (HTTP 4xx; names the field)
    │   └── DeploymentError        a deployment action is invalid (names the field)
    └── Unavailable            the service cannot score now (HTTP 5xx: no model, slow feature store)
"""

from __future__ import annotations


class TideError(Exception):
    """Root of every error Tide raises on purpose."""


class ConfigError(TideError):
    pass


class StackError(TideError):
    pass


class DefinitionError(TideError):
    """A project definition is invalid; the message names the file, the object and the field."""


class UnknownViewVersion(DefinitionError):
    pass


class BreakingChange(DefinitionError):
    """``tide apply`` refused breaking changes; ``changes`` lists them (kind, name, what)."""

    def __init__(self, message: str, changes: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.changes = changes


class RegistryConflict(DefinitionError):
    """Another apply registered a version first (compare-and-set lost): re-plan against it."""


class SchemaError(TideError):
    pass


class UnknownSchemaError(SchemaError):
    pass


class StreamError(TideError):
    pass


class FeatureError(TideError):
    pass


class TrainingError(TideError):
    pass


class ServingError(TideError):
    pass


class ModelLoadError(ServingError):
    pass


class DigestMismatch(ModelLoadError):
    """An artifact's bytes do not hash to the sha256 its record names (raised by one check everywhere)."""


class LineageMismatch(ModelLoadError):
    """A model version's lineage (view versions, inputs, task) cannot be served under the definitions
    served now; what served before keeps serving."""


class RequestError(ServingError):
    """A client error. ``field`` names the offending field, ``status`` is the HTTP status."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


class DeploymentError(RequestError):
    pass


class Unavailable(ServingError):
    """The service cannot score right now (HTTP 5xx): no model yet, the feature store is slow or down."""

    def __init__(self, message: str, *, status: int = 503, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
