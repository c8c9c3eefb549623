"""The feature pipeline on Apache Flink (PyFlink): the scale-out alternative to the feature processor.

It runs in its own virtual environment (``make flink-venv``: PyFlink pins numpy, pandas, pyarrow and
redis below what the rest of Tide uses) and shares only the pure feature code with the single-machine
path: :mod:`schemas.definitions` (a project's views, from a definitions JSON document),
:mod:`features.admission`, :mod:`features.tiles`, :mod:`features.store` (the apply calls and scripts) and
:mod:`schemas.codec`. Notes: docs/2026-11-21-flink.md.
"""
