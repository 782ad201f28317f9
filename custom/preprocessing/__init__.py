"""Layer 3: nnU-Net preprocessing of one case (and its inverse), its dictionary transforms and the case cache."""
