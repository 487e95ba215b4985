"""Learning R1 and R2 for one decoder layer by minimising the entropy loss (SPEC §4)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..logs import rotation_summary
from ..settings import RotationSettings
from .fuse import block_diag, expand_kv_blocks
from .loss import InputStatistic, LossVariant, ScoreName, linear_entropy, squared_entropy

log = logging.getLogger(__name__)


def loss_statistic_inputs(variant: LossVariant = "paper") -> dict[str, str]:
    """The linears whose input statistics the loss needs, by the column factor they define.

    down_proj is rotated on its output side only, so its groups are columns and a per-column
    factor cancels in each column's normalisation (SPEC §3): the paper variant never builds its
    Gram (intermediate², the layer's largest) nor, for SparseGPT, its inverse. The reference
    variant keeps it, because the reference code applies it in bf16, where it changes the rounding.
    """
    needed = {"attn": "q", "o": "o", "mlp": "gate"}
    return {**needed, "down": "down"} if variant == "reference" else needed


@dataclass
class LayerProblem:
    """Frozen, norm-folded weights of one layer and the input statistics of its linears."""

    weights: dict[str, torch.Tensor]
    inputs: dict[str, InputStatistic]
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_layer(
        cls,
        weights: dict[str, torch.Tensor],
        grams: dict[str, torch.Tensor | None],
        score: ScoreName,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        variant: LossVariant = "paper",
        percdamp: float = 0.01,
    ) -> LayerProblem:
        """`grams` holds the Gram matrix of the inputs of the linears in
        `loss_statistic_inputs(variant)`, keyed by linear name (others are ignored)."""
        inputs = {
            key: InputStatistic.from_gram(score, grams.get(name), variant=variant, percdamp=percdamp)
            for key, name in loss_statistic_inputs(variant).items()
        }
        inputs.setdefault("down", InputStatistic(score, None, variant=variant))  # it would cancel
        return cls(
            {name: weight.detach().to(torch.float32) for name, weight in weights.items()},
            inputs,
            num_heads,
            num_kv_heads,
            head_dim,
        )

    def identity(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.weights["q"].device
        hidden = self.weights["q"].shape[1]
        rotation = torch.eye(hidden, device=device)
        blocks = torch.eye(self.head_dim, device=device).repeat(self.num_kv_heads, 1, 1)
        return rotation, blocks


def layer_loss(
    problem: LayerProblem, rotation: torch.Tensor, blocks: torch.Tensor, variant: LossVariant
) -> torch.Tensor:
    """SPEC §3 layer loss: the plain sum of the group entropies of the seven linears fused with
    R1 `rotation` (d, d) and the R2 `blocks` (n_kv, d_head, d_head); no weights, no regulariser.
    A 0-d tensor in fp32 (fp64 when the rotation is; bf16 arithmetic for `variant="reference"`)."""
    # float32 as the paper; float64 when the rotation is (tests compare implementations there).
    if variant == "reference":
        compute_dtype = torch.bfloat16
    else:
        compute_dtype = torch.promote_types(torch.float32, rotation.dtype)
    weight = {name: w.to(compute_dtype) for name, w in problem.weights.items()}
    r1 = rotation.to(compute_dtype)
    r2v = block_diag(blocks).to(compute_dtype)
    r2o = block_diag(expand_kv_blocks(blocks, problem.num_heads)).to(compute_dtype)

    factors = {
        "attn": problem.inputs["attn"].column_factor(rotation),
        "o": problem.inputs["o"].column_factor(block_diag(expand_kv_blocks(blocks, problem.num_heads))),
        "mlp": problem.inputs["mlp"].column_factor(rotation),
        "down": problem.inputs["down"].column_factor(None),
    }
    factors = {key: None if f is None else f.to(compute_dtype) for key, f in factors.items()}

    # SPEC §2 fusion: q, k, gate, up: W R1; v: R2vᵀ W R1; o: R1ᵀ W R2o; down: R1ᵀ W.
    # Groups (SPEC §3): rows for an input-side rotation, columns for an output-side one.
    loss = linear_entropy(weight["q"] @ r1, factors["attn"], rows=True, columns=False)
    loss = loss + linear_entropy(weight["k"] @ r1, factors["attn"], rows=True, columns=False)
    loss = loss + linear_entropy(r2v.T @ weight["v"] @ r1, factors["attn"], rows=True, columns=True)
    loss = loss + linear_entropy(r1.T @ weight["o"] @ r2o, factors["o"], rows=True, columns=True)
    loss = loss + linear_entropy(weight["gate"] @ r1, factors["mlp"], rows=True, columns=False)
    loss = loss + linear_entropy(weight["up"] @ r1, factors["mlp"], rows=True, columns=False)
    loss = loss + linear_entropy(r1.T @ weight["down"], factors["down"], rows=False, columns=True)
    return loss.to(torch.promote_types(torch.float32, compute_dtype))


class FusedLayerLoss:
    """The same function as `layer_loss` (paper variant), with the work arranged for speed.

    - the five input-side weights (q, k, v, gate, up) are stacked into one matrix, so W·Q is a
      single matmul (`_StackedProduct`);
    - the attn/mlp column factors diag(Qᵀ M Q) take M·Q outside the graph (`_QuadraticDiagonal`);
    - R2 acts per head (batched 64×64 products), never as a dense block-diagonal matrix;
    - o and down share one Qᵀ· matmul; down's column factor is left out, as it cancels in its
      column groups (`loss_statistic_inputs`); the o column factor only needs the per-head
      diagonal blocks of H_o (or of H_λ⁻¹), computed once;
    - the SparseGPT inverse is factored once (`InputStatistic.from_gram`).
    """

    def __init__(self, problem: LayerProblem, dtype: torch.dtype = torch.float32) -> None:
        w = {name: weight.to(dtype) for name, weight in problem.weights.items()}
        self.num_heads, self.num_kv_heads = problem.num_heads, problem.num_kv_heads
        self.head_dim = problem.head_dim
        # Row blocks sharing a column factor are adjacent, so they are views of one product.
        self.stacked = torch.cat([w["q"], w["k"], w["gate"], w["up"], w["v"]])
        self.sizes = [
            w["q"].shape[0] + w["k"].shape[0],
            w["gate"].shape[0] + w["up"].shape[0],
            w["v"].shape[0],
        ]
        # The attn/mlp column factors need diag(Qᵀ M Q) for a symmetric M (H for Wanda, H_λ⁻¹
        # for SparseGPT). Its gradient 2·(M Q)·diag(g) is elementwise in the product M Q, so M Q
        # is computed outside the graph and M never enters a backward matmul.
        self.quadratic_statistics = {
            key: problem.inputs[key] for key in ("attn", "mlp") if problem.inputs[key].matrix is not None
        }
        quadratics = [_symmetric_matrix(statistic, dtype) for statistic in self.quadratic_statistics.values()]
        self.quadratic = torch.cat(quadratics) if quadratics else None
        heads, hd = self.num_heads, self.head_dim
        self.o_stat = o_stat = problem.inputs["o"]
        if o_stat.matrix is None:
            self.o_blocks = None
        else:
            matrix = o_stat.matrix.to(dtype)
            if o_stat.score == "wanda":  # diagonal blocks H[h, h]
                self.o_blocks = torch.stack(
                    [matrix[h * hd : (h + 1) * hd, h * hd : (h + 1) * hd] for h in range(heads)]
                )
            else:  # diagonal blocks of UᵀU = H_λ⁻¹
                columns = matrix.view(matrix.shape[0], heads, hd).transpose(0, 1)
                self.o_blocks = columns.transpose(-1, -2) @ columns
        self.o_width = w["o"].shape[1]
        self.right = torch.cat([w["o"], w["down"]], dim=1)  # Qᵀ [W_o | W_down]

    def __call__(self, rotation: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        heads, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        z_qk, z_gate_up, z_v = _StackedProduct.apply(rotation, self.stacked, self.sizes)
        factors: dict[str, torch.Tensor | None] = {"attn": None, "mlp": None}
        if self.quadratic is not None:
            with torch.no_grad():
                products = torch.split(self.quadratic @ rotation.detach(), rotation.shape[0])
            for (key, statistic), product in zip(self.quadratic_statistics.items(), products, strict=True):
                factors[key] = statistic.factor_from_diagonal(_QuadraticDiagonal.apply(rotation, product))
        f_attn, f_mlp = factors["attn"], factors["mlp"]

        # v: R2vᵀ (W_v Q), one hd×hd block per KV head
        v = (blocks.transpose(-1, -2) @ z_v.view(kv, hd, -1)).reshape(kv * hd, -1)
        # o: (Qᵀ W_o) R2o, one block per query head (repeat_kv order); down: Qᵀ W_down
        left = rotation.T @ self.right
        hidden = left.shape[0]
        expanded = expand_kv_blocks(blocks, heads)
        o_left = left[:, : self.o_width].reshape(hidden, heads, hd).transpose(0, 1)
        o = (o_left @ expanded).transpose(0, 1).reshape(hidden, heads * hd)
        f_o = None
        if self.o_blocks is not None:
            diagonal = (expanded * (self.o_blocks @ expanded)).sum(dim=1).reshape(-1)
            f_o = self.o_stat.factor_from_diagonal(diagonal)

        loss = squared_entropy(z_qk, f_attn, rows=True, columns=False)
        loss = loss + squared_entropy(z_gate_up, f_mlp, rows=True, columns=False)
        loss = loss + squared_entropy(v, f_attn, rows=True, columns=True)
        loss = loss + squared_entropy(o, f_o, rows=True, columns=True)
        loss = loss + squared_entropy(left[:, self.o_width :], None, rows=False, columns=True)
        return loss


def _symmetric_matrix(statistic: InputStatistic, dtype: torch.dtype) -> torch.Tensor:
    """M with diag(Qᵀ M Q) the statistic's rotated diagonal: H (Wanda) or UᵀU = H_λ⁻¹ (SparseGPT)."""
    assert statistic.matrix is not None
    if statistic.score == "wanda":
        return statistic.matrix.to(dtype)
    upper = statistic.matrix.to(torch.float64)
    return (upper.T @ upper).to(dtype)


class _StackedProduct(torch.autograd.Function):
    """The row blocks of `stacked @ rotation` (sizes `sizes`), as views of one matmul; the
    backward accumulates Σ_k W_kᵀ dZ_k into one buffer instead of concatenating the dZ_k."""

    @staticmethod
    def forward(ctx, rotation, stacked, sizes):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(stacked)
        ctx.sizes = sizes
        return tuple(torch.split(stacked @ rotation, sizes))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        (stacked,) = ctx.saved_tensors
        grad_rotation = None
        for block, grad in zip(torch.split(stacked, ctx.sizes), grads, strict=True):
            if grad is None:
                continue
            if grad_rotation is None:
                grad_rotation = block.T @ grad
            else:
                grad_rotation.addmm_(block.T, grad)
        return grad_rotation, None, None


class _QuadraticDiagonal(torch.autograd.Function):
    """diag(Qᵀ M Q) = Σ_rows Q ⊙ (M Q) from Q and the product P = M Q (M symmetric, constant);
    the gradient w.r.t. Q is 2·P·diag(g), no matmul."""

    @staticmethod
    def forward(ctx, rotation, product):  # type: ignore[override]
        ctx.save_for_backward(product)
        return (rotation * product).sum(dim=0)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (product,) = ctx.saved_tensors
        return product * (2.0 * grad_output)[None, :], None


def orthogonal_from(free: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition with R's diagonal made positive, so Q(I) = I and Q is continuous."""
    q, r = torch.linalg.qr(free)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


@dataclass
class RotationResult:
    rotation: torch.Tensor
    head_blocks: torch.Tensor
    loss_start: float
    loss_best: float
    best_step: int
    steps: int  # updates actually made (fewer than configured after an early stop)
    seconds: float
    loss_trace: list[float] = field(default_factory=list)  # loss at step 0..steps
    optimizer: str = "paper"
    evaluations: int = 0  # loss evaluations (line-search trials included)
    damping: float = 0.0  # largest relative damping of the SparseGPT statistics' inverses
    stop_reason: str = "steps"

    def summary(self) -> dict[str, float | int | str]:
        return {
            "entropy_before": self.loss_start,
            "entropy_after": self.loss_best,
            "rotation_best_step": self.best_step,
            "rotation_steps": self.steps,
            "rotation_seconds": self.seconds,
            "rotation_optimizer": self.optimizer,
            "rotation_evaluations": self.evaluations,
            "rotation_damping": self.damping,
            "rotation_stop": self.stop_reason,
        }

    def log_line(self) -> str:
        """One readable line per layer, the pipeline's wording (`logs.rotation_summary`) plus the
        optimizer and time, e.g. `loss 812.3 → 640.1 (-21.2%), 137 steps (best at 130), stopped:
        converged, optimizer cayley, 4.2 s`."""
        return f"{rotation_summary(self.summary())}, optimizer {self.optimizer}, {self.seconds:.1f} s"


# (step, rotation, blocks, loss) at every accepted iterate; returning True stops training.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, float], "bool | None"]


def _problem_damping(problem: LayerProblem) -> float:
    return max((statistic.damping for statistic in problem.inputs.values()), default=0.0)


def train_rotation(
    problem: LayerProblem,
    settings: RotationSettings,
    progress: bool = True,
    description: str = "rotation",
    callback: StepCallback | None = None,
) -> RotationResult:
    """Learn R1 and R2 for one layer; keeps the best iterate seen (identity included).

    `callback(step, rotation, blocks, loss)` is called at every accepted iterate (step 0 is
    the identity); benchmarks use it to evaluate a shared loss outside their timers. If it
    returns True, training stops there (stop reason "callback").
    """
    bar = tqdm(
        total=settings.steps,
        desc=description,
        leave=False,
        disable=not (progress and sys.stderr.isatty()),
    )
    try:
        if settings.optimizer == "paper":
            result = _train_paper(problem, settings, bar, description, callback)
        elif settings.optimizer == "cayley":
            result = _train_cayley(problem, settings, bar, description, callback)
        elif settings.optimizer == "lbfgs":
            result = _train_lbfgs(problem, settings, bar, description, callback)
    finally:
        bar.close()
    result.damping = _problem_damping(problem)
    return result


@dataclass
class _BestIterate:
    """The bookkeeping every optimizer shares: the loss trace, the starting loss and the best
    iterate seen (the identity is evaluated first, so it is a candidate too)."""

    best: tuple[torch.Tensor, torch.Tensor]
    description: str
    best_loss: float = float("inf")
    best_step: int = 0
    loss_start: float = float("nan")
    trace: list[float] = field(default_factory=list)

    def see(self, step: int, value: float, rotation: torch.Tensor, blocks: torch.Tensor) -> bool | None:
        """Record the loss of iterate `step`: True if it is a new best (kept as a copy), False if
        not, None if it is not finite (logged; the caller stops)."""
        self.trace.append(value)
        if not math.isfinite(value):
            log.warning("%s: non-finite loss at step %d; keeping the best so far", self.description, step)
            return None
        if step == 0:
            self.loss_start = value
        if value >= self.best_loss:
            return False
        self.best_loss, self.best_step = value, step
        self.best = (rotation.detach().clone(), blocks.detach().clone())
        return True

    def result(self, optimizer: str, steps: int, started: float, stop: str) -> RotationResult:
        return RotationResult(
            rotation=self.best[0],
            head_blocks=self.best[1],
            loss_start=self.loss_start,
            loss_best=self.best_loss,
            best_step=self.best_step,
            steps=steps,
            seconds=time.perf_counter() - started,
            loss_trace=self.trace,
            optimizer=optimizer,
            evaluations=len(self.trace),
            stop_reason=stop,
        )


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

    progress = _BestIterate((identity_rotation, identity_blocks), description)
    steps_run = 0
    stop = "steps"
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


def cayley_retract(rotation: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """Q·cay(Ω), the body-frame Cayley step, as one linear solve: with X(I − Ω/2) = Q,
    Q·cay(Ω) = 2X − Q (no explicit inverse, no extra matmul; batched over leading dims)."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return 2.0 * torch.linalg.solve(eye - skew / 2, rotation, left=False) - rotation


def _skew(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix - matrix.transpose(-1, -2)) / 2


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
    stop = "steps"
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
                stop = "converged"
                break

    best_step = min(range(len(trace)), key=lambda i: (trace[i], i)) if trace else 0
    return RotationResult(
        rotation=rotation.to(torch.float32),
        head_blocks=blocks.to(torch.float32),
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


def _loss_function(problem: LayerProblem, settings: RotationSettings):
    """The loss the fast optimisers evaluate: fused for the paper variant (same function),
    the straightforward bf16 one for the reference variant."""
    if settings.loss_variant == "paper":
        return FusedLayerLoss(problem)
    return lambda rotation, blocks: layer_loss(problem, rotation, blocks, settings.loss_variant)


@contextlib.contextmanager
def loss_matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """float32 matmuls at `precision` (torch.set_float32_matmul_precision) inside the block on a
    CUDA device; restored afterwards. A CPU keeps "highest": there "high" may mean bf16 passes
    (oneDNN), and the CPU path is the reproducible fp32 reference."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _orthonormalised(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest-by-QR orthogonal matrix (float64 QR, signs fixed), to undo float32 drift."""
    return orthogonal_from(matrix.to(torch.float64)).to(matrix.dtype)


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
