from .bundle import BraTSBundleTrainTask
