"""DenoiseRotator rotations: fusing them into weights, their entropy loss, and learning them."""
