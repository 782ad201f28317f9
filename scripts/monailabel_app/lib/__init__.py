"""MONAI Label glue for the uncertainty-aware nnU-Net, laid out like MONAI Label's sample apps.

MONAI Label puts the app directory on ``sys.path``, so these modules import as ``lib.<name>``:

- ``configs/``: the model as a ``TaskConfig`` (conf, infer tasks, trainer, scoring, strategies)
- ``infers/``: infer tasks (``BundleInferTask`` on inference.json; the shared ``UncertaintySegmenter`` path)
- ``trainers/``: the train task (the bundle's train.json on the labeled studies)
- ``activelearning/``: the ``most_uncertain`` strategy
- ``scoring/``: the ``uncertainty`` scoring method
- ``transforms/``: study checks, output selection, the uncertain region
- ``labels.py``: label names and values; ``datastore.py``: the checked studies datastore;
  ``security.py``: what a request may do
"""
