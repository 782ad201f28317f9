"""Layer 4: the uncertainty method: error target and EMA rates, the case-space store, agreement metrics, baselines."""
