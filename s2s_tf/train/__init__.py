"""Training: the distributed trainer loop, the S2SNet stages, losses, optimizers, strategies."""
