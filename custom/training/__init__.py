"""Layer 5: what the training bundle chains: sampling, batches, losses, validation metrics, Ignite handlers."""
