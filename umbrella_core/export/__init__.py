"""``umbrella export``: :mod:`.folder` writes a checkpoint as a folder others can use.

:mod:`.model_card` writes its README. An application above the kernel: nothing
in config, data, model or train imports it (``umbrella_core.model.exported``
reads the folder back).
"""
