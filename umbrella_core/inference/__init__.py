"""Answers from a trained model: :mod:`.generate` (greedy decoding, a checkpoint loaded for it).

Training (its evaluations), evaluation, serving and the CLI import it; it
imports only the kernel below it (configuration, data, model).
"""
