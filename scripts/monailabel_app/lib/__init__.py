"""MONAI Label glue for the uncertainty-aware nnU-Net: studies, inference, scoring, strategy, training.

The app directory is put on ``sys.path`` by MONAI Label, so these modules import as ``lib.<name>``.
"""
