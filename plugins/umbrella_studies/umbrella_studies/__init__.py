"""UMBRELLA study readers for BIDS folders and five public cohorts.

The hook implementation lives in :mod:`umbrella_studies.plugin`; importing
this package loads neither torch nor nibabel (readers look at file names and
JSON sidecars only).
"""

from __future__ import annotations

from umbrella_studies.templates import TASKS, TaskStats, last_stats

__version__ = "0.2.0"

__all__ = ["TASKS", "TaskStats", "last_stats", "__version__"]
