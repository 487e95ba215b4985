"""The paper's optimizer (SPEC §4 as written): Adam on the matrices behind QR, with lr, betas and
gradient clipping, for exactly `steps`."""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from denoiserotator.method.rotation.fused_loss import loss_matmul_precision
from denoiserotator.method.rotation.iterate import STOP_BUDGET, RotationResult, StepCallback, _BestIterate
from denoiserotator.method.rotation.orthogonal import block_diagonal_mask, orthogonal_from
from denoiserotator.method.rotation.problem import LayerProblem, layer_loss
from denoiserotator.settings import RotationSettings

log = logging.getLogger(__name__)


def _train_paper(
    problem: LayerProblem,
    settings: RotationSettings,
    bar: tqdm,
    description: str,
    callback: StepCallback | None,
) -> RotationResult:
    """SPEC §4 as written: Adam on the free matrices behind QR, clipped, full steps."""
    start = time.perf_counter()
    identity_rotation, identity_blocks = problem.identity()
    free_rotation = identity_rotation.clone().requires_grad_(True)
    free_blocks = identity_blocks.clone().requires_grad_(settings.learn_r2)
    parameters = [free_rotation] + ([free_blocks] if settings.learn_r2 else [])
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, betas=settings.betas)
    # block-diagonal R1: the free matrix stays block-diagonal, and so does its QR factor
    mask = (
        block_diagonal_mask(free_rotation.shape[0], settings.r1_blocks, free_rotation.device)
        if settings.r1_blocks > 1
        else None
    )

    progress = _BestIterate((identity_rotation, identity_blocks), description)
    steps_run = 0
    stop = STOP_BUDGET
    # steps + 1 evaluations: the loss after the last update is a candidate too.
    for step in range(settings.steps + 1):
        rotation = orthogonal_from(free_rotation)
        blocks = orthogonal_from(free_blocks)
        with loss_matmul_precision(settings.matmul_precision, free_rotation.device):
            loss = layer_loss(problem, rotation, blocks, settings.loss_variant)  # type: ignore[arg-type]
        value = float(loss.detach())
        if progress.see(step, value, rotation, blocks) is None:
            stop = "non-finite loss"
            break
        if step == settings.steps:
            if callback is not None:
                callback(step, rotation.detach(), blocks.detach(), value)
            break
        if callback is not None and callback(step, rotation.detach(), blocks.detach(), value):
            stop = "callback"
            break
        optimizer.zero_grad(set_to_none=True)
        with loss_matmul_precision(settings.matmul_precision, free_rotation.device):
            loss.backward()
        if mask is not None:
            free_rotation.grad.mul_(mask)  # type: ignore[union-attr]
        norm = torch.nn.utils.clip_grad_norm_(parameters, settings.clip)
        if not torch.isfinite(norm):
            log.warning("%s: non-finite gradient at step %d; stopping early", description, step)
            stop = "non-finite gradient"
            break
        optimizer.step()
        steps_run = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.2f}", best=f"{progress.best_loss:.2f}")

    return progress.result("paper", steps_run, start, stop)
