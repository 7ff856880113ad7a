"""Records to batches: manifests, the demo study, datasets, the interleaver and the collator."""
