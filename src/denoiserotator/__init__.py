"""DenoiseRotator: learned orthogonal rotations that concentrate weight importance before pruning."""

__version__ = "0.1.0"
