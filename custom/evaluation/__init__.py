"""Layer 4: scoring (numpy/scipy, no torch): BraTS 2023 segmentation metrics, uncertainty quality, run folders."""
