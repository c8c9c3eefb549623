"""Tide's public API: declare a project's sources, entities, features, labels and models.

    from tide import Entity, Feature, FeatureView, Labels, Model, Source
    from tide import Canary, Drift, Policy, Retrain  # what the loop does on its own for a model

A project is a folder of Python files whose module-level objects are these definitions; ``tide plan``
checks them, ``tide apply`` registers them, and every service runs what the registry holds. For
notebooks, :mod:`tide.notebook` loads a project and reads online features, point-in-time training sets
and progressive evaluations.
"""

from schemas.definitions import Aggregation, Entity, Feature, FeatureView, Labels, Model, Project, Source
from schemas.policy import Canary, Drift, Policy, Retrain

__all__ = [
    "Aggregation",
    "Canary",
    "Client",
    "Drift",
    "Entity",
    "Feature",
    "FeatureView",
    "Labels",
    "Model",
    "Policy",
    "Project",
    "Retrain",
    "Source",
]


def __getattr__(name: str) -> object:
    # The client pulls in the Kafka client; definitions files should not pay for it.
    if name == "Client":
        from tide.client import Client

        return Client
    raise AttributeError(f"module 'tide' has no attribute {name!r}")
