"""Adam in the tangent space of the orthogonal group with the Cayley retraction, on the fused loss;
backs off to the best iterate."""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from denoiserotator.method.rotation.fused_loss import loss_matmul_precision
from denoiserotator.method.rotation.iterate import RotationResult, StepCallback, _BestIterate, _loss_function
from denoiserotator.method.rotation.orthogonal import _orthonormalised, _skew, cayley_retract
from denoiserotator.method.rotation.problem import LayerProblem
from denoiserotator.settings import RotationSettings

log = logging.getLogger(__name__)


def _train_cayley(
    problem: LayerProblem,
    settings: RotationSettings,
    bar: tqdm,
    description: str,
    callback: StepCallback | None,
) -> RotationResult:
    """Adam in the body frame of O(d) × O(hd)^n_kv with the Cayley retraction.

    One loss and gradient evaluation per step. Iterates are float32 products of Cayley
    factors, re-orthonormalised every 50 steps (drift stays ~1e-6).
    """
    start = time.perf_counter()
    rotation, blocks = problem.identity()
    loss_fn = _loss_function(problem, settings)
    device = rotation.device
    learn_blocks = settings.learn_r2
    beta1, beta2, eps = *settings.tangent_betas, 1e-8
    first = [torch.zeros_like(rotation), torch.zeros_like(blocks)]
    second = [torch.zeros_like(rotation), torch.zeros_like(blocks)]
    progress = _BestIterate((rotation, blocks), description)
    # Back-off: after `backoff` steps without a new best, return to the best iterate with fresh
    # moments and half the step (a fixed step that overshoots otherwise keeps raising the loss).
    step_scale, since_best, moment_step = 1.0, 0, 0
    best_trace: list[float] = []
    best_tangent: list[torch.Tensor] = []
    stop = "steps"
    steps_run = 0
    for step in range(settings.steps + 1):
        r = rotation.detach().requires_grad_(True)
        b = blocks.detach().requires_grad_(learn_blocks)
        with loss_matmul_precision(settings.matmul_precision, device):
            loss = loss_fn(r, b)
        value = float(loss.detach())
        improved = progress.see(step, value, rotation, blocks)
        if improved is None:
            stop = "non-finite loss"
            break
        since_best = 0 if improved else since_best + 1
        best_loss = progress.best_loss
        best_trace.append(best_loss)
        requested = callback is not None and callback(step, rotation, blocks, value)
        if step == settings.steps:
            break
        if requested:
            stop = "callback"
            break
        if settings.tol > 0 and step >= settings.patience:
            if best_trace[step - settings.patience] - best_loss < settings.tol * abs(best_loss):
                stop = "converged"
                break
        # A loss that jumps above the best (a step that overshot a sharp valley) backs off at
        # once; waiting `backoff` steps would spend them climbing back down.
        jumped = value - best_loss > settings.rise_limit * abs(best_loss)
        if jumped or (settings.backoff and since_best >= settings.backoff):
            step_scale, since_best, moment_step = step_scale / 2, 0, 0
            rotation, blocks = progress.best[0].clone(), progress.best[1].clone()
            for moment in (*first, *second):
                moment.zero_()
            # The best iterate's gradient was computed when it was reached: no second evaluation.
            tangent = best_tangent
        else:
            with loss_matmul_precision(settings.matmul_precision, device):
                grads = torch.autograd.grad(loss, [r, b] if learn_blocks else [r])
            if not all(torch.isfinite(g).all() for g in grads):
                log.warning("%s: non-finite gradient at step %d; stopping early", description, step)
                stop = "non-finite gradient"
                break
            tangent = [_skew(rotation.T @ grads[0])]
            if learn_blocks:
                tangent.append(_skew(blocks.transpose(-1, -2) @ grads[1]))
            if improved:
                best_tangent = tangent
        t = step + 1
        moment_step += 1
        moves = []
        for index, g in enumerate(tangent):
            first[index].mul_(beta1).add_(g, alpha=1 - beta1)
            second[index].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denominator = (second[index] / (1 - beta2**moment_step)).sqrt_().add_(eps)
            # the skew part: Adam's elementwise scaling of a skew matrix is skew already
            lr = settings.tangent_lr * step_scale
            moves.append(first[index] / denominator * (-lr / (1 - beta1**moment_step)))
        rotation = cayley_retract(rotation, moves[0])
        if learn_blocks:
            blocks = cayley_retract(blocks, moves[1])
        if t % 50 == 0:
            rotation, blocks = _orthonormalised(rotation), _orthonormalised(blocks)
        steps_run = t
        bar.update(1)
        bar.set_postfix(loss=f"{value:.2f}", best=f"{best_loss:.2f}")

    return progress.result("cayley", steps_run, start, stop)
