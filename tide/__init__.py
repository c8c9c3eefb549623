"""Tide's public API: declare a project's sources, entities, features, labels and models.

    from tide import Entity, Feature, FeatureView, Labels, Model, Source

A project is a folder of Python files whose module-level objects are these definitions; ``tide plan``
checks them, ``tide apply`` registers them, and every service runs what the registry holds. For
notebooks, :mod:`tide.notebook` loads a project and reads online features, point-in-time training sets
and progressive evaluations.
"""

from schemas.definitions import Aggregation, Entity, Feature, FeatureView, Labels, Model, Project, Source

__all__ = ["Aggregation", "Entity", "Feature", "FeatureView", "Labels", "Model", "Project", "Source"]
