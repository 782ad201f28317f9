"""Layer 3: region/label conversion, case-coordinate channels and nnU-Net patch sampling (array and dict forms)."""
