"""Layer 1: BraTS case folders and NIfTI files in and out, the datalist and folds, synthetic cases."""
