"""Errors that ntkviz reports to users: each carries a message meant to be shown as it is."""


class NtkvizError(Exception):
    """Base class of the errors a user can cause and fix (bad files, missing devices, …).
    ``title`` heads the message box the app shows."""

    title = "Error"


class DatasetError(NtkvizError):
    """A dataset is missing, truncated or corrupt; the message names the set and the directory."""

    title = "Dataset not readable"


class CheckpointError(NtkvizError):
    """A checkpoint cannot be read or does not fit the model."""

    title = "Checkpoint not readable"


class FileWriteError(NtkvizError, OSError):
    """A file could not be written (missing or read-only directory, full disk); the message names
    the file. Also an ``OSError``, so code that catches those keeps working."""

    title = "File not written"


class FileReadError(NtkvizError, ValueError):
    """A result file (e.g. a run's accounts) is missing, damaged or of another kind; the message
    names the file. Also a ``ValueError``, as such files raised before."""

    title = "File not readable"


class DeviceError(NtkvizError):
    """The requested device is not available."""

    title = "Device not available"


class TrainingDiverged(NtkvizError):
    """A training step's loss or updated parameters were not finite; the model was put back as
    it was before that step."""

    title = "Training diverged"

    def __init__(self, step: int, lr: float, loss: float):
        self.step, self.lr, self.loss = step, lr, loss
        super().__init__(
            f"training diverged at step {step} (learning rate {lr:.3g}, loss {loss}); "
            "the model was put back as the last completed step left it — try a smaller learning "
            "rate"
        )


class StepDiverged(NtkvizError):
    """One step at learning rate ``lr`` makes the model's parameters or outputs non-finite."""

    title = "Step diverged"

    def __init__(self, lr: float, what: str = "the model's outputs", prefix: str = ""):
        self.lr = lr
        super().__init__(
            f"{prefix}a step with η = {lr:.3g} makes {what} non-finite (the learning rate "
            "diverges); choose a smaller η"
        )


class NonFiniteLogits(NtkvizError):
    """The model's logits before any step are NaN or infinite on the examples named."""

    title = "Logits not finite"

    def __init__(self, which: list[str]):
        shown = ", ".join(which[:5]) + (f" and {len(which) - 5} more" if len(which) > 5 else "")
        super().__init__(
            f"the model's logits on {shown} are not finite before any step: the model has "
            "diverged (reset or retrain it), or it gives NaN or ±inf on these inputs"
        )


class ModelError(NtkvizError):
    """A model cannot be loaded or does not work on the data; the message names the model, the
    data shape and what went wrong."""

    title = "Model not usable"
