"""Training: the jitted train step, the loop with periodic evaluation and checkpoints
(``train``), the optimiser and schedule (``optim``) and the two-room overfit check
(``overfit``)."""
