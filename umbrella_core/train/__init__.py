"""Training: configuration, the Trainer subclass, the run, evaluation."""
