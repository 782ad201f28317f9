"""Layer 2: nnU-Net self-configuration: dataset fingerprint -> experiment plan (``plans.json``)."""
