"""UMBRELLA modality plugin for T1-weighted structural MRI.

The hooks live in :mod:`umbrella_t1.plugin`, registered through the
``umbrella`` entry-point group; :mod:`umbrella_t1.preprocess` turns a file into a
model input and :mod:`umbrella_t1.phantom` makes synthetic samples.
"""

__version__ = "0.2.0"
