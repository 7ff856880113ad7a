"""Model assembly: patch embedders, the vision body, projector and language model."""
