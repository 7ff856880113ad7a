"""Held-out evaluation: task-aware metrics, answer scoring, figures."""
