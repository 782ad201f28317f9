"""Ignite handlers of the training bundle, one concern per module.

Each handler has ``attach(engine)`` so configs list it under ``train_handlers`` / ``val_handlers``. Files are
written only by the main process (rank 0) and always atomically (:mod:`custom.core.atomic`).

Event order that the configs rely on (Ignite fires handlers of one event in attach order):
trainer ``EPOCH_COMPLETED``: LR step -> validation -> :class:`~custom.training.handlers.monitoring.MetricsCSVHandler`
-> :class:`~custom.training.handlers.checkpoint.TrainingCheckpointHandler`, so ``checkpoint_last.pt`` holds the
stepped scheduler and the validation state of the same epoch.
"""
