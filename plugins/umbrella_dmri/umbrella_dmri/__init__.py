"""UMBRELLA modality plugin for diffusion MRI, as FA and MD maps.

The hooks live in :mod:`umbrella_dmri.plugin`, registered through the
``umbrella`` entry-point group; :mod:`umbrella_dmri.preprocess` turns the maps
into a model input and :mod:`umbrella_dmri.phantom` makes synthetic maps.
"""

__version__ = "0.2.1"
