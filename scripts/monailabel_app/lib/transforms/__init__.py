from .transforms import (
    DEFAULT_UNCERTAIN_THRESHOLD,
    OUTPUTS,
    BundleOutputd,
    CheckStudyd,
    check_threshold,
    error_probability,
    prediction_summary,
    select_output,
    uncertain_region,
)
