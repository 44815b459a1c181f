"""Training: state, optimizer, losses and the generic jitted step."""

from r1jax.train.losses import distill_loss, reward_loss, sft_loss
from r1jax.train.optim import make_optimizer
from r1jax.train.state import TrainState, create, full_params, merge_router_bias, split_router_bias
from r1jax.train.step import make_step

__all__ = ["distill_loss", "reward_loss", "sft_loss", "make_optimizer", "TrainState", "create",
           "full_params", "merge_router_bias", "split_router_bias", "make_step"]
