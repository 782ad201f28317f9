"""Custom components of the uncertainty-aware nnU-Net BraTS bundle (see bundle/docs/DESIGN.md)."""

__version__ = "0.1.0"
