"""Layer 3: the network (MONAI DynUNet from the plan), its inference wrappers, the cancer mask and checkpoint loading."""
