"""Records to batches: manifests, the demo study, datasets, the interleaver and the collator."""

from umbrella_core.data.batch import Batch

__all__ = ["Batch"]
