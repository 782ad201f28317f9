"""Layer 5: THE inference path shared by the bundle run, Triton's volume model and the MONAI Label app."""
