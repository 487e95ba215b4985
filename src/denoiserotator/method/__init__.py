"""The method: model adapters, pruners, rotations (fusing, loss, optimizers) and the sequential
layer engine with its statistics, checks and checkpoints. Nothing here imports the plan
(denoiserotator.plan) or the test helpers (denoiserotator.testing)."""
