"""Layer 7: multi-step procedures the scripts expose: prepare a work directory, cross-validate, report, study."""
