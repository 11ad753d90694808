"""torch.optim against optax: optimizer steps, trajectories, schedules and state (`OptimizerPair`).

pair        OptimizerPair and optimizer_pair: the record, and the factory from torch's hyperparameters
mapping     torch.optim hyperparameters -> the optax transformation that computes the same step
groups      torch param groups on a parameter pytree, and their masked optax pieces
transforms  optax transformations for torch formulas optax has no setting for
schedules   torch.optim.lr_scheduler -> optax schedules, the step convention explicit
state       optimizer state between torch.optim and optax, through one neutral form
problems    the losses trajectories run on, and the strategies that draw them
sides       both sides of a trajectory, NumPy in and out
trajectory  one drawn example on both sides, and the n-step tolerance
runner      an OptimizerPair's checks under Hypothesis: CheckRecords
causes      causes read from the trajectories: an update one step late, decay on other parameters
diagnose    why a check failed: the example re-run under controlled changes; rounding acceptance
naive       naive ports (each library's defaults) and what differs: the known-divergence table
"""
from equivcheck.optim.pair import (
    OPTIM_CHECKS,
    OptimizerPair,
    Schedule,
    Unmatched,
    load_torch_state,
    optax_state_from_torch,
    optimizer_pair,
)

__all__ = ["OPTIM_CHECKS", "OptimizerPair", "Schedule", "Unmatched", "load_torch_state", "optax_state_from_torch",
           "optimizer_pair"]
