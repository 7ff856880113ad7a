"""The core's own tiny-model fixtures, built in code (nothing is downloaded).

* :mod:`tiny_models.families` builds tiny look-alikes of language-model
  families (Llama 3, Qwen2.5, Gemma 3, Phi-3, SmolLM2): their special tokens,
  real chat templates (``chat_templates/``) and vocabulary sizes, with random
  tiny weights;
* :mod:`tiny_models.llava` tiny LLaVA checkpoints of each layout (CLIP
  llava-1.5, SigLIP llava-interleave and LLaVA-OneVision) and vision towers.

They serve the repository's tests and benchmarks and are not installed with
umbrella-core (the plugin author's kit is :mod:`umbrella_core.testing`). The
tests import them as ``tiny_models`` (pyproject's pytest ``pythonpath`` puts
``tests/`` on ``sys.path``); a benchmark puts ``tests/`` on ``sys.path`` itself.
"""
