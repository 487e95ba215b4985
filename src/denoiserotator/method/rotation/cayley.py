"""Adam in the tangent space of the orthogonal group with the Cayley retraction, on the fused loss;
backs off to the best iterate with the step really halved, and stops at a measured plateau."""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from denoiserotator.method.rotation.fused_loss import loss_matmul_precision
from denoiserotator.method.rotation.iterate import (
    STOP_BUDGET,
    STOP_PLATEAU,
    RotationResult,
    StepCallback,
    _BestIterate,
    _loss_function,
)
from denoiserotator.method.rotation.orthogonal import _orthonormalised, _skew, cayley_retract
from denoiserotator.method.rotation.problem import LayerProblem
from denoiserotator.settings import RotationSettings

log = logging.getLogger(__name__)

class _TangentAdam:
    """Adam's moments for the skew tangents of R1 and R2 (one pair per factor).

    `snapshot()` / `restore()` keep the moments as they were right after the best iterate's
    update, so a back-off repeats the move made from the best iterate at a smaller scale instead
    of restarting Adam (fresh moments make the next move a sign step, larger than any before).
    """

    def __init__(self, shapes: list[torch.Tensor], betas: tuple[float, float], eps: float = 1e-8) -> None:
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.first = [torch.zeros_like(x) for x in shapes]
        self.second = [torch.zeros_like(x) for x in shapes]
        self.count = 0

    def update(self, tangents: list[torch.Tensor]) -> None:
        self.count += 1
        for first, second, g in zip(self.first, self.second, tangents, strict=True):
            first.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
            second.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)

    def moves(self, lr: float) -> list[torch.Tensor]:
        """The bias-corrected Adam moves at step size `lr` (skew: the elementwise scaling of a
        skew matrix by a symmetric one is skew)."""
        c1, c2 = 1 - self.beta1**self.count, 1 - self.beta2**self.count
        return [
            first / (second / c2).sqrt().add_(self.eps) * (-lr / c1)
            for first, second in zip(self.first, self.second, strict=True)
        ]

    def snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        return [m.clone() for m in self.first], [v.clone() for v in self.second], self.count

    def restore(self, saved: tuple[list[torch.Tensor], list[torch.Tensor], int]) -> None:
        self.first = [m.clone() for m in saved[0]]
        self.second = [v.clone() for v in saved[1]]
        self.count = saved[2]


def _capped(moves: list[torch.Tensor], limits: list[float]) -> list[torch.Tensor]:
    """Each move scaled down, if needed, to Frobenius norm at most its limit."""
    out = []
    for move, limit in zip(moves, limits, strict=True):
        norm = float(torch.linalg.vector_norm(move))
        out.append(move * (limit / norm) if norm > limit > 0 else move)
    return out


def _train_cayley(
    problem: LayerProblem,
    settings: RotationSettings,
    bar: tqdm,
    description: str,
    callback: StepCallback | None,
) -> RotationResult:
    """Adam in the body frame of O(d) × O(hd)^n_kv with the Cayley retraction.

    One loss and gradient evaluation per step. Iterates are float32 products of Cayley factors,
    re-orthonormalised every 50 steps; the returned best iterate once more, in float64.

    Back-off (after `backoff` steps without a new best, or at once when the loss rises by more
    than `rise_limit`): back to the best iterate, Adam's moments as they were there, half the step;
    the first move after it is at most half the last move before it. Stop reasons: "plateau" (the
    best loss improved by less than `tol` (relative) over the last `patience` steps, none of which
    followed a back-off, i.e. measured at a constant step), "step floor" (`max_halvings` back-offs
    found no descent), "step budget" (`steps` reached), "callback", "non-finite loss/gradient".
    """
    start = time.perf_counter()
    rotation, blocks = problem.identity()
    loss_fn = _loss_function(problem, settings)
    device = rotation.device
    learn_blocks = settings.learn_r2
    adam = _TangentAdam([rotation, blocks] if learn_blocks else [rotation], settings.tangent_betas)
    progress = _BestIterate((rotation, blocks), description)
    at_best = adam.snapshot()
    since_best, halvings, window_start = 0, 0, 0
    last_norms: list[float] = []
    best_trace: list[float] = []
    stop = STOP_BUDGET
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
        if settings.tol > 0 and step - window_start >= settings.patience:
            if best_trace[step - settings.patience] - best_loss < settings.tol * abs(best_loss):
                stop = STOP_PLATEAU
                break
        # A loss that jumps above the best (a step that overshot a sharp valley) backs off at
        # once; waiting `backoff` steps would spend them climbing back down.
        jumped = value - best_loss > settings.rise_limit * abs(best_loss)
        if jumped or (settings.backoff and since_best >= settings.backoff):
            if halvings == settings.max_halvings:
                stop = "step floor"
                break
            halvings += 1
            since_best, window_start = 0, step
            rotation, blocks = progress.best[0].clone(), progress.best[1].clone()
            adam.restore(at_best)
            moves = _capped(adam.moves(settings.tangent_lr * 0.5**halvings), [n / 2 for n in last_norms])
        else:
            with loss_matmul_precision(settings.matmul_precision, device):
                grads = torch.autograd.grad(loss, [r, b] if learn_blocks else [r])
            if not all(torch.isfinite(g).all() for g in grads):
                log.warning("%s: non-finite gradient at step %d; stopping early", description, step)
                stop = "non-finite gradient"
                break
            tangents = [_skew(rotation.T @ grads[0])]
            if learn_blocks:
                tangents.append(_skew(blocks.transpose(-1, -2) @ grads[1]))
            adam.update(tangents)
            if improved:
                at_best = adam.snapshot()
            moves = adam.moves(settings.tangent_lr * 0.5**halvings)
        last_norms = [float(torch.linalg.vector_norm(move)) for move in moves]
        rotation = cayley_retract(rotation, moves[0])
        if learn_blocks:
            blocks = cayley_retract(blocks, moves[1])
        steps_run = step + 1
        if steps_run % 50 == 0:
            rotation, blocks = _orthonormalised(rotation), _orthonormalised(blocks)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.2f}", best=f"{best_loss:.2f}")

    return progress.result("cayley", steps_run, start, stop)
