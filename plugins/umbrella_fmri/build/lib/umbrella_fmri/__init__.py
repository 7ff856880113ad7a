"""UMBRELLA modality plugin for BOLD fMRI series.

The hooks live in :mod:`umbrella_fmri.plugin`, registered through the
``umbrella`` entry-point group; :mod:`umbrella_fmri.preprocess` turns a series
into a model input and :mod:`umbrella_fmri.phantom` makes synthetic series.
"""

__version__ = "0.2.0"
