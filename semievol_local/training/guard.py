"""The divergence guard of a training run: a step's loss far above the recent steps' is caught at once, and
the run goes back to the start of the best of those steps at half the learning rate (`mlx_engine.train`).

What it keeps are references, not copies (MLX arrays are immutable): the LoRA weights and optimizer state at
the start of the last KEPT_STEPS steps, with each step's loss. Every data-parallel process holds the same
(the loss is summed over processes), so all of them roll back together.
"""
from __future__ import annotations

DIVERGE_RATIO, DIVERGE_MARGIN = 4.0, 2.0  # a loss this many times its running floor, and this many nats above it
KEPT_STEPS = 3  # the steps whose starting weights a rollback can return to
MAX_ROLLBACKS = 3


def diverged(loss: float, before: list[float]) -> float | None:
    """The running floor (the lowest of the recent step losses `before`) where `loss` jumped far above it, else
    None. A real 1.5B model at the default lr went 0.46, 0.2, 0.11, then 13.5 at the first step at the peak
    rate, and ended at 3.5 answering one letter everywhere; SmolLM2 at lr 1e-2 went 2.06, 9.1, 42. A batch's
    mean answer loss more than 2 nats above the floor is the batch mostly wrong with confidence, not noise."""
    if not before:
        return None
    floor = float(min(before))
    return floor if loss > DIVERGE_RATIO * floor and loss > floor + DIVERGE_MARGIN else None


class Guard:
    """{step: [LoRA weights, optimizer state, the step's loss]} at the start of the last KEPT_STEPS steps, and
    the rollbacks so far (a resumed run's come from its checkpoint)."""

    def __init__(self, rollbacks: list[dict] | None = None):
        self.kept: dict[int, list] = {}
        self.rollbacks: list[dict] = list(rollbacks or [])

    def start(self, step: int, weights: dict, opt_state) -> None:
        """Step `step` starts from these."""
        self.kept[step] = [weights, opt_state, None]
        self.kept = {k: v for k, v in self.kept.items() if k > step - KEPT_STEPS}

    def finished(self, step: int, loss: float) -> None:
        self.kept[step][2] = loss

    def before_nan(self, step: int) -> dict:
        """The weights before those that gave step `step` a non-finite loss (the last finite loss's start)."""
        return self.kept[max(step - 1, min(self.kept))][0]

    def jumped(self, step: int, loss: float) -> int | None:
        """The kept step to go back to (the one whose loss was lowest) where `loss` diverged, else None (a step's
        loss measures the weights it started from: the kept steps' losses, this one's beside them)."""
        losses = {k: v[2] for k, v in self.kept.items() if k < step}
        if losses and diverged(loss, list(losses.values())) is not None:
            return min(losses, key=losses.get)
        return None

    def loss(self, step: int) -> float:
        return self.kept[step][2]

    def weights(self, step: int) -> dict:
        return self.kept[step][0]

    def back_to(self, step: int, record: dict):
        """Note rollback `record` and forget the steps from `step` on (they run again): (weights, optimizer state)."""
        self.rollbacks.append(record)
        weights, opt_state, _ = self.kept[step]
        self.kept = {k: v for k, v in self.kept.items() if k < step}
        return weights, opt_state

    def summary(self) -> dict:
        """How many rollbacks, and each in a phrase (the CLI's table and the report show it)."""
        return {"rollbacks": len(self.rollbacks),
                "rollback_steps": "; ".join(f"step {r['step']}: loss {r['loss']:.3g} against {r['level']:.3g}, "
                                            f"then lr x{r['lr_scale']:g}" for r in self.rollbacks)}
