"""Riemannian L-BFGS with backtracking on the orthogonal group."""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from denoiserotator.method.rotation.fused_loss import loss_matmul_precision
from denoiserotator.method.rotation.iterate import (
    STOP_BUDGET,
    STOP_PLATEAU,
    RotationResult,
    StepCallback,
    _loss_function,
)
from denoiserotator.method.rotation.orthogonal import _orthonormalised, _skew, cayley_retract
from denoiserotator.method.rotation.problem import LayerProblem
from denoiserotator.settings import RotationSettings

log = logging.getLogger(__name__)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def _train_lbfgs(
    problem: LayerProblem,
    settings: RotationSettings,
    bar: tqdm,
    description: str,
    callback: StepCallback | None,
) -> RotationResult:
    """Riemannian L-BFGS on O(d) × O(hd)^n_kv with the Cayley retraction and Armijo backtracking.

    Iterates are kept in float64 (the retraction's products stay orthogonal to ~1e-15) and
    cast to float32 for the loss. Tangent vectors live in the body frame (Q·Ω, Ω skew), and
    the L-BFGS pairs are carried over unchanged between frames (left translation). The line
    search only accepts decreases, so the last iterate is the best; the identity (step 0) is
    a candidate like any other.
    """
    start = time.perf_counter()
    identity_rotation, identity_blocks = problem.identity()
    work = torch.float64
    loss_fn = _loss_function(problem, settings)
    device = identity_rotation.device
    learn_blocks = settings.learn_r2

    def evaluate_with_leaves(
        rotation: torch.Tensor, blocks: torch.Tensor
    ) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        r = rotation.to(torch.float32).requires_grad_(True)
        b = blocks.to(torch.float32).requires_grad_(learn_blocks)
        with loss_matmul_precision(settings.matmul_precision, device):
            loss = loss_fn(r, b)
        return float(loss.detach()), loss, [r, b] if learn_blocks else [r]

    def grad_of(loss: torch.Tensor, leaves: list[torch.Tensor], rotation: torch.Tensor, blocks: torch.Tensor):
        with loss_matmul_precision(settings.matmul_precision, device):
            grads = torch.autograd.grad(loss, leaves)
        if not all(torch.isfinite(g).all() for g in grads):
            return None
        g_rotation = _skew(rotation.T @ grads[0].to(work))
        if learn_blocks:
            g_blocks = _skew(blocks.transpose(-1, -2) @ grads[1].to(work))
        else:
            g_blocks = torch.zeros_like(blocks)
        return [g_rotation, g_blocks]

    rotation = identity_rotation.to(work)
    blocks = identity_blocks.to(work)
    value, loss, leaves = evaluate_with_leaves(rotation, blocks)
    evaluations = 1
    loss_start = value
    trace = [value]
    stop = STOP_BUDGET
    steps_run = 0
    grad = grad_of(loss, leaves, rotation, blocks) if math.isfinite(value) else None
    if grad is None:
        log.warning("%s: non-finite loss or gradient at the identity; keeping it", description)
        stop = "non-finite loss"
    if callback is not None and callback(0, rotation.to(torch.float32), blocks.to(torch.float32), value):
        grad, stop = None, "callback"
    history: list[tuple[list[torch.Tensor], list[torch.Tensor], float]] = []
    while grad is not None and steps_run < settings.steps:
        direction = _lbfgs_direction(grad, history)
        slope = _dot(grad, direction)
        if not history or slope >= 0:
            history.clear()
            norm = math.sqrt(_dot(grad, grad))
            if norm == 0:
                stop = "zero gradient"
                break
            direction = [-g * (settings.first_step / norm) for g in grad]
            slope = _dot(grad, direction)
        accepted = None
        t = 1.0
        for _ in range(settings.max_backtracks + 1):
            trial_rotation = cayley_retract(rotation, t * direction[0])
            trial_blocks = cayley_retract(blocks, t * direction[1]) if learn_blocks else blocks
            trial_value, trial_loss, trial_leaves = evaluate_with_leaves(trial_rotation, trial_blocks)
            evaluations += 1
            if math.isfinite(trial_value) and trial_value <= value + 1e-4 * t * slope and trial_value < value:
                accepted = (trial_rotation, trial_blocks, trial_value, trial_loss, trial_leaves)
                break
            t *= 0.5
        if accepted is None:
            if history:
                history.clear()  # retry once along the steepest descent
                continue
            stop = "no descent"
            break
        new_rotation, new_blocks, new_value, new_loss, new_leaves = accepted
        new_grad = grad_of(new_loss, new_leaves, new_rotation, new_blocks)
        if new_grad is None:
            log.warning("%s: non-finite gradient at step %d; stopping early", description, steps_run + 1)
            stop = "non-finite gradient"
            # the point itself has a finite, lower loss: keep it
        step_vec = [t * d for d in direction]
        if new_grad is not None:
            change = [b - a for a, b in zip(grad, new_grad, strict=True)]
            curvature = _dot(step_vec, change)
            if curvature > 1e-10 * math.sqrt(_dot(step_vec, step_vec) * _dot(change, change)):
                history.append((step_vec, change, 1.0 / curvature))
                if len(history) > settings.history:
                    history.pop(0)
        rotation, blocks, value, grad = new_rotation, new_blocks, new_value, new_grad
        steps_run += 1
        trace.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.2f}")
        requested = callback is not None and callback(
            steps_run, rotation.to(torch.float32), blocks.to(torch.float32), value
        )
        if grad is None:
            break
        if requested:
            stop = "callback"
            break
        if settings.tol > 0 and steps_run >= settings.patience:
            earlier = trace[steps_run - settings.patience]
            if earlier - value < settings.tol * abs(value):
                stop = STOP_PLATEAU
                break

    best_step = min(range(len(trace)), key=lambda i: (trace[i], i)) if trace else 0
    return RotationResult(
        rotation=_orthonormalised(rotation.to(torch.float64)),
        head_blocks=_orthonormalised(blocks.to(torch.float64)),
        loss_start=loss_start,
        loss_best=value,
        best_step=best_step,
        steps=steps_run,
        seconds=time.perf_counter() - start,
        loss_trace=trace,
        optimizer="lbfgs",
        evaluations=evaluations,
        stop_reason=stop,
    )


def _lbfgs_direction(
    grad: list[torch.Tensor], history: list[tuple[list[torch.Tensor], list[torch.Tensor], float]]
) -> list[torch.Tensor]:
    """−H·grad by the L-BFGS two-loop recursion (initial scaling sᵀy/yᵀy)."""
    q = [g.clone() for g in grad]
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * _dot(s, q)
        alphas.append(alpha)
        q = [a - alpha * b for a, b in zip(q, y, strict=True)]
    if history:
        s, y, rho = history[-1]
        gamma = 1.0 / (rho * _dot(y, y))
        q = [a * gamma for a in q]
    for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
        beta = rho * _dot(y, q)
        q = [a + (alpha - beta) * b for a, b in zip(q, s, strict=True)]
    return [-a for a in q]
