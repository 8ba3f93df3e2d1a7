"""The training loop's own state: where a run is (``RunState``, in every checkpoint), the epoch's
sums so far (``EpochSums``) and why the loop stopped (``Stop``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class EpochSums:
    """The current epoch so far, as last read from the device."""
    loss: float = 0.0        # sum over the steps that updated
    top1: float = 0.0
    good_steps: int = 0
    seconds: float = 0.0


@dataclass
class RunState:
    """Where a run is: everything a checkpoint needs besides the model and optimizer."""
    epoch: int = 0           # epochs completed
    batch: int = 0           # batches of epoch `epoch` done
    step: int = 0
    bad_steps: int = 0       # skipped (non-finite) steps in all
    bad_run: int = 0         # ... in a row, up to now
    train_time: float = 0.0
    history: list = field(default_factory=list)
    random_init: dict | None = None
    current: EpochSums = field(default_factory=EpochSums)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])
        self.current = EpochSums(**state["current"])

    def position(self, steps_per_epoch: int, epochs: int) -> str:
        """Where the run is, in the one numbering every message uses (epochs from 1)."""
        if self.batch == 0:
            return f"after epoch {self.epoch} of {epochs} (step {self.step})"
        return (f"in epoch {self.epoch + 1} of {epochs}, after batch {self.batch} of "
                f"{steps_per_epoch} (step {self.step})")


@dataclass
class Stop:
    """Why the loop ended: "done", "signal" (with its number), "bad_steps", or "bad_files"
    (with the message saying how many)."""
    reason: str
    signum: int = 0
    message: str = ""
