from .transforms import (
    DEFAULT_UNCERTAIN_THRESHOLD,
    IDENTITY,
    OUTPUTS,
    BundleOutputd,
    CheckStudyd,
    ErrorProbability,
    check_threshold,
    prediction_summary,
    select_output,
    uncertain_region,
)
