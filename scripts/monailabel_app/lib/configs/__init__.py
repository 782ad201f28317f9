from .brats_uncertainty import BraTSUncertainty
