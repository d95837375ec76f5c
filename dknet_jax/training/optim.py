"""Optimiser: optax AdamW with DKNet's schedule (constant, then cosine; warmup optional).

Part of the training flow: data -> losses -> **optimiser** -> checkpoints.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate_schedule(
    *, lr: float, total_steps: int, cosine_start_step: int, final_lr: float, warmup_steps: int = 0
) -> optax.Schedule:
    """lr(step): linear warmup 0 -> lr over ``warmup_steps``, constant until
    ``cosine_start_step``, then cosine from lr down to ``final_lr`` at ``total_steps``
    (and ``final_lr`` after)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    cosine_start_step = min(max(cosine_start_step, warmup_steps), total_steps)
    decay_steps = max(total_steps - cosine_start_step, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.where(warmup_steps > 0, jnp.minimum(step / max(warmup_steps, 1), 1.0), 1.0)
        t = jnp.clip((step - cosine_start_step) / decay_steps, 0.0, 1.0)
        cosine = final_lr + 0.5 * (lr - final_lr) * (1.0 + jnp.cos(jnp.pi * t))
        return warm * jnp.where(step < cosine_start_step, lr, cosine)

    return schedule


def make_optimizer(train_config, total_steps: int, steps_per_epoch: int):
    """AdamW (+ optional global-norm clipping) from ``config.train``, on the flattened
    parameters.

    ``optax.flatten``: gradients and parameters are raveled into one vector and the
    moments are kept as one vector each, so the update is a handful of fused passes
    instead of a chain per parameter leaf (the paper model has ~270 leaves): the same
    numbers; the paper train step traces 18,673 -> 13,515 equations and compiles ~5 s
    faster (docs/benchmarks.md, "Train-step compile time"). The checkpointed
    optimiser state is those flat vectors: a checkpoint written with per-leaf moments
    does not resume (``CheckpointMismatchError``) but still evaluates and predicts,
    which read the parameters only.

    Returns (optax.GradientTransformation, schedule)."""
    schedule = learning_rate_schedule(
        lr=train_config.lr,
        total_steps=total_steps,
        cosine_start_step=train_config.cosine_start_epoch * steps_per_epoch,
        final_lr=train_config.final_lr,
        warmup_steps=train_config.warmup_steps,
    )
    parts = []
    if train_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_config.grad_clip))
    parts.append(optax.adamw(schedule, weight_decay=train_config.weight_decay))
    return optax.flatten(optax.chain(*parts)), schedule
