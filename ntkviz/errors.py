"""Errors that ntkviz reports to users: each carries a message meant to be shown as it is."""


class NtkvizError(Exception):
    """Base class of the errors a user can cause and fix (bad files, missing devices, …)."""


class DatasetError(NtkvizError):
    """A dataset is missing, truncated or corrupt; the message names the set and the directory."""


class CheckpointError(NtkvizError):
    """A checkpoint cannot be read or does not fit the model."""


class DeviceError(NtkvizError):
    """The requested device is not available."""


class TrainingDiverged(NtkvizError):
    """Training produced a non-finite loss; the model was restored to its last finite state."""

    def __init__(self, step: int, lr: float, loss: float):
        self.step, self.lr, self.loss = step, lr, loss
        super().__init__(
            f"training diverged at step {step} (learning rate {lr:.3g}, loss {loss}); "
            "the model was restored to its last finite state — try a smaller learning rate"
        )
