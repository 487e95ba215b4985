"""Counted work of each stage, as pure functions of a decoder layer's shapes, and its time on a device.

Every function mirrors what the code does today (not an idealised algorithm), so that a resource
request follows the code's real cost:

* `rotation_step`: one Adam step of `rotation.train.train_rotation` (SPEC §3–4): QR of the free
  d×d matrix and of the R2 blocks, the fused weights (W·Q for q, k, gate, up; R2vᵀ·W_v·Q; Qᵀ·W_o·R2o;
  Qᵀ·W_down), the rotated score statistics diag(Rᵀ M R) of Wanda/SparseGPT, then backward.
* `layer_forward` + `gram_accumulation`: one pass of the calibration tokens through a layer while
  hooks sum x xᵀ for chosen linears (`pipeline.input_statistics`).
* `sparsegpt_linear`: `pruners.sparsegpt.sparsegpt_prune` (three fp64 Cholesky-type d³ terms, the
  column sweep with rank-1 updates, the lazy block updates).
* `prune_job`: `pipeline.process_layer` for every layer, composed from the above.
* `perplexity_forward`, `zeroshot_forward`: evaluation.

A `Work` holds FLOPs per arithmetic precision ("fp64", "fp32", "tf32", "bf16"), the part of them
that torch's `FlopCounterMode` reports for the same code (matrix products: mm, addmm, bmm;
eager attention), and sequential kernel launches (SparseGPT's per-column loop, which is latency-
bound on a GPU). FLOPs the counter does not see: QR and its triangular solve, Cholesky and
cholesky_inverse, `addr_` rank-1 updates, elementwise work (the entropies). In-place `addmm_`
(Gram accumulation) and CPU SDPA attention kernels are also not counted by torch 2.13's counter,
although they are matrix products; `Work.matmul` includes them (tests count them out of place).

`seconds` turns a `Work` into time with the table `DEVICES` of documented peak rates and assumed
achievable fractions (bench/gpu_check.py measures them; until its JSON exists, every GPU time here
is an estimate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from denoiserotator.settings import ModelEntry

PRECISIONS: tuple[str, ...] = ("fp64", "fp32", "tf32", "bf16")

# What method/rotation/ does: the loss's float32 matmuls at `rotation.matmul_precision`, TF32
# ("high", the default) or fp32 ("highest") on a CUDA device, fp32 on a CPU (a CPU profile rates
# both alike); the "reference" loss variant casts the fused weights to bf16.
ROTATION_MATMUL_PRECISION = "tf32"
REFERENCE_LOSS_PRECISION = "bf16"

# Kernel launches per column of SparseGPT's sweep (where, sub, div, addr_, two column copies;
# N:M adds the group mask every M columns): measured sequence of the loop body, rounded up.
SPARSEGPT_LAUNCHES_PER_COLUMN = 8


# ---------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class LayerShape:
    """Shapes of a Llama-like decoder layer (Llama, Qwen2, Mistral): hidden size d, attention heads,
    KV heads, head dimension, MLP width and the number of layers; vocab for the lm_head (0 = left out).

    Linear weights are (out, in): q (heads·head_dim, d), k and v (kv_heads·head_dim, d),
    o (d, heads·head_dim), gate and up (intermediate, d), down (d, intermediate).
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int = 0

    FIELDS = ("hidden", "layers", "intermediate", "heads", "kv_heads")

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"LayerShape.{name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> LayerShape | None:
        """From a config model entry's optional `shape` (head_dim defaults to hidden / heads). None
        when the entry has no shape."""
        shape = entry.shape
        if shape is None:
            return None
        head_dim = shape.head_dim or shape.hidden // shape.heads
        return cls(shape.hidden, shape.heads, shape.kv_heads, head_dim, shape.intermediate, shape.layers)

    @classmethod
    def from_hf_config(cls, config: Any) -> LayerShape:
        """From a transformers config (LlamaConfig, Qwen2Config, MistralConfig)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, heads, config.num_key_value_heads or heads, head_dim,
                   config.intermediate_size, config.num_hidden_layers, config.vocab_size)  # fmt: skip

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of the seven linears."""
        d, a, kv, f = self.hidden, self.attn_width, self.kv_width, self.intermediate
        return {"q": (a, d), "k": (kv, d), "v": (kv, d), "o": (d, a),
                "gate": (f, d), "up": (f, d), "down": (d, f)}  # fmt: skip

    @property
    def layer_params(self) -> int:
        """Weights of the seven linears of one layer (norms and biases left out)."""
        return sum(out * inp for out, inp in self.linears().values())

    @property
    def params(self) -> int:
        """Decoder weights of the whole model plus embedding and lm_head (untied)."""
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden


# The pipeline's true-sequential input groups (adapters.base.INPUT_GROUPS).
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


# ---------------------------------------------------------------------------------------------
# work


@dataclass(frozen=True)
class Work:
    """FLOPs by precision, the matmul part of them (what FlopCounterMode sees) and sequential kernel
    launches. Add with +, scale with * (a count of repetitions)."""

    flops: Mapping[str, float] = field(default_factory=dict)
    matmul: float = 0.0
    launches: float = 0.0

    def __add__(self, other: Work) -> Work:
        flops = dict(self.flops)
        for key, value in other.flops.items():
            flops[key] = flops.get(key, 0.0) + value
        return Work(flops, self.matmul + other.matmul, self.launches + other.launches)

    def __mul__(self, times: float) -> Work:
        return Work({k: v * times for k, v in self.flops.items()}, self.matmul * times, self.launches * times)

    __rmul__ = __mul__

    @property
    def total(self) -> float:
        return float(sum(self.flops.values()))


def _mm(flops: float, precision: str, counted: bool = True) -> Work:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    return Work({precision: float(flops)}, float(flops) if counted else 0.0)


def total(works: Iterable[Work]) -> Work:
    result = Work()
    for work in works:
        result = result + work
    return result


def qr(n: int, batch: int = 1, backward: bool = True, precision: str = "fp32") -> Work:
    """`rotation.train.orthogonal_from` on `batch` n×n matrices. Householder QR (geqrf) and forming Q
    (orgqr): 4/3 n³ each, not counted by FlopCounterMode. Its backward (torch's linalg_qr_backward
    for square inputs): three n×n products (counted, 6 n³) and a triangular solve (n³, not counted)."""
    work = _mm(batch * 8 / 3 * n**3, precision, counted=False)
    if backward:
        work = work + _mm(batch * 6 * n**3, precision) + _mm(batch * n**3, precision, counted=False)
    return work


def rotation_step(
    shape: LayerShape,
    score: str,
    learn_r2: bool = True,
    backward: bool = True,
    precision: str = ROTATION_MATMUL_PRECISION,
    statistic_precision: str = ROTATION_MATMUL_PRECISION,
    with_qr: bool = True,
) -> Work:
    """One evaluation of `rotation.train.layer_loss` plus the QRs that make R1 and R2 (SPEC §3–4);
    with `backward`, its gradient too (one step of train_rotation; Adam and clipping are
    elementwise and left out). `precision`: the fused-weight products; `statistic_precision`: the
    diag(Rᵀ M R) products of the Wanda/SparseGPT scores (fp32 even in the bf16 reference variant).

    Backward of A·B costs one product per operand that needs a gradient: the frozen weights need
    none, so W·Q costs one more product, while (R2vᵀ·W_v)·Q and (Qᵀ·W_o)·R2o cost two.
    `with_qr` False: without the QRs, as the `cayley` and `lbfgs` optimisers evaluate this loss
    (reference variant) on orthogonal iterates. Raises ValueError for an unknown score or precision.
    """
    if score not in ("magnitude", "wanda", "sparsegpt"):
        raise ValueError(f"unknown score {score!r}")
    d, a, kv, f = shape.hidden, shape.attn_width, shape.kv_width, shape.intermediate
    grad = 1 if backward else 0
    r2_grad = grad if learn_r2 else 0
    # Forward products, each paired with how many backward products it needs.
    products = [
        (2 * a * d * d, 1 + grad),  # W_q · Q
        (2 * kv * d * d, 1 + grad),  # W_k · Q
        (2 * kv * kv * d, 1 + r2_grad),  # R2vᵀ · W_v
        (2 * kv * d * d, 1 + grad + r2_grad),  # (R2vᵀ W_v) · Q
        (2 * d * d * a, 1 + grad),  # Qᵀ · W_o
        (2 * d * a * a, 1 + r2_grad + grad),  # (Qᵀ W_o) · R2o
        (2 * 2 * f * d * d, 1 + grad),  # W_gate · Q, W_up · Q
        (2 * d * d * f, 1 + grad),  # Qᵀ · W_down
    ]
    work = _mm(sum(flops * times for flops, times in products), precision)
    if score != "magnitude":
        # diag(Rᵀ M R) as (R * (M @ R)).sum(0): M @ R for attention and MLP inputs (R1), o (R2o);
        # the input of down is not rotated on its input side: its diagonal is read directly.
        statistic = 2 * d**3 * (1 + grad) * 2 + 2 * a**3 * (1 + r2_grad)
        work = work + _mm(statistic, statistic_precision)
    if with_qr:
        work = work + qr(d, backward=backward, precision="fp32")
        r2_backward = backward and learn_r2
        work = work + qr(shape.head_dim, batch=shape.kv_heads, backward=r2_backward, precision="fp32")
    return work


def fused_loss_step(
    shape: LayerShape,
    score: str,
    learn_r2: bool = True,
    backward: bool = True,
    precision: str = ROTATION_MATMUL_PRECISION,
) -> Work:
    """One evaluation of `rotation.train.FusedLayerLoss` (the paper loss arranged for speed, what
    the `cayley` and `lbfgs` optimisers evaluate), with its gradient when `backward`.

    The five input-side weights are one stacked product W·Q; R2 acts per head (batched hd×hd
    products); o and down share one Qᵀ·[W_o | W_down]; the score statistics need M·Q outside the
    graph (no backward product) and the per-head H_o blocks · R2o. Raises ValueError for an
    unknown score or precision.
    """
    if score not in ("magnitude", "wanda", "sparsegpt"):
        raise ValueError(f"unknown score {score!r}")
    d, a, kv, f = shape.hidden, shape.attn_width, shape.kv_width, shape.intermediate
    heads, hd = shape.heads, shape.head_dim
    grad = 1 if backward else 0
    r2_grad = grad if learn_r2 else 0
    products = [
        (2 * (a + 2 * kv + 2 * f) * d * d, 1 + grad),  # [W_q; W_k; W_gate; W_up; W_v] · Q
        (2 * kv * hd * d, 1 + grad + r2_grad),  # R2vᵀ · (W_v Q), per KV head
        (2 * d * d * (a + f), 1 + grad),  # Qᵀ · [W_o | W_down]
        (2 * heads * d * hd * hd, 1 + grad + r2_grad),  # (Qᵀ W_o) · R2o, per query head
    ]
    work = _mm(sum(flops * times for flops, times in products), precision)
    if score != "magnitude":
        # [M_attn; M_mlp] · Q without a graph, and diag(R2oᵀ H_o,h R2o) per query head
        work = work + _mm(2 * 2 * d**3 + 2 * heads * hd**3 * (1 + r2_grad), precision)
    return work


def fused_loss_setup(shape: LayerShape, score: str) -> Work:
    """`FusedLayerLoss.__init__`: for SparseGPT, UᵀU = H_λ⁻¹ of the attention and MLP inputs in
    fp64 and the per-head diagonal blocks of H_λ⁻¹ for o in fp32; nothing for the other scores."""
    if score != "sparsegpt":
        return Work()
    d, a, hd = shape.hidden, shape.attn_width, shape.head_dim
    return _mm(2 * 2 * d**3, "fp64") + _mm(2 * shape.heads * hd * hd * a, "fp32")


def body_frame_step(
    shape: LayerShape, learn_r2: bool = True, precision: str = "fp32", retract: bool = True
) -> Work:
    """The `cayley`/`lbfgs` update after a gradient: the body-frame tangents Qᵀ·∇ (counted) and,
    with `retract`, the Cayley retraction, one LU solve per matrix (≈ 8/3 n³, not counted)."""
    d, hd, kv = shape.hidden, shape.head_dim, shape.kv_heads
    sizes = [(d, 1)] + ([(hd, kv)] if learn_r2 else [])
    work = _mm(sum(2 * batch * n**3 for n, batch in sizes), precision)
    if retract:
        work = work + _mm(sum(8 / 3 * batch * n**3 for n, batch in sizes), precision, counted=False)
    return work


def loss_statistic_linears(variant: str = "paper") -> list[str]:
    """The linears whose input Grams the rotation loss needs: `rotation.train.loss_statistic_inputs`
    (q, o, gate; and down in the reference variant), mirrored here to keep this module torch-free
    (`tests/plan/test_flops.py` checks they agree)."""
    return ["q", "o", "gate"] + (["down"] if variant == "reference" else [])


def statistic_setup(shape: LayerShape, score: str, variant: str = "paper") -> Work:
    """`LayerProblem.from_layer`: for SparseGPT, Cholesky (n³/3) and cholesky_inverse (2n³/3) of the
    damped Gram in fp64 for the inputs of `loss_statistic_linears(variant)`."""
    if score != "sparsegpt":
        return Work()
    linears = shape.linears()
    return _mm(sum(linears[name][1] ** 3 for name in loss_statistic_linears(variant)), "fp64", counted=False)


OPTIMIZERS: tuple[str, ...] = ("paper", "cayley", "lbfgs")  # rotation.optimizer


def rotation_training(
    shape: LayerShape,
    score: str,
    steps: int,
    learn_r2: bool = True,
    variant: str = "paper",
    matmul: str = ROTATION_MATMUL_PRECISION,
    optimizer: str = "paper",
) -> Work:
    """`train_rotation` on one layer with `optimizer`: `steps` steps plus the final evaluation
    (steps + 1 losses), after `statistic_setup`. variant "reference" computes the fused products
    in bf16; `matmul` is the precision of the other float32 products ("tf32" or "fp32").

    - "paper": Adam behind QR on `layer_loss` (`rotation_step`);
    - "cayley": `FusedLayerLoss` (paper variant; `layer_loss` without QR for "reference") and the
      body-frame update in fp32 (`body_frame_step`);
    - "lbfgs": the same loss, the update in fp64, one evaluation per step plus the identity's (a
      rejected line-search trial costs one more forward, which the job's margin covers).
    Raises ValueError for an unknown optimizer.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {OPTIMIZERS}")
    precision = REFERENCE_LOSS_PRECISION if variant == "reference" else matmul
    setup = statistic_setup(shape, score, variant)
    if optimizer == "paper":
        step = rotation_step(shape, score, learn_r2, precision=precision, statistic_precision=matmul)
        last = rotation_step(
            shape, score, learn_r2, backward=False, precision=precision, statistic_precision=matmul
        )
        return setup + step * steps + last
    if variant == "paper":
        setup = setup + fused_loss_setup(shape, score)

        def loss(backward: bool) -> Work:
            return fused_loss_step(shape, score, learn_r2, backward, precision)
    else:

        def loss(backward: bool) -> Work:
            return rotation_step(shape, score, learn_r2, backward, precision, matmul, with_qr=False)

    if optimizer == "cayley":
        return setup + (loss(True) + body_frame_step(shape, learn_r2)) * steps + loss(False)
    # lbfgs: the identity's loss and tangent first, then one accepted trial per step
    first = loss(True) + body_frame_step(shape, learn_r2, "fp64", retract=False)
    return setup + first + (loss(True) + body_frame_step(shape, learn_r2, "fp64")) * steps


# The order in which a decoder layer's forward runs its linears and attention products.
FORWARD_ORDER: tuple[str, ...] = ("q", "k", "v", "attention", "o", "gate", "up", "down")


def layer_forward(
    shape: LayerShape, tokens: int, seqlen: int, precision: str = "fp32", stop: str | None = None
) -> Work:
    """One decoder layer on `tokens` tokens in sequences of `seqlen`: the seven linears
    (2 · tokens · weights) and attention scores and values (2 · 2 · tokens · seqlen · heads·head_dim;
    full square: eager and SDPA kernels compute the masked half too). `stop`: the forward ends
    at the entry of that linear, so only what `FORWARD_ORDER` puts before it runs."""
    parts = FORWARD_ORDER if stop is None else FORWARD_ORDER[: FORWARD_ORDER.index(stop)]
    linears = sum(2 * tokens * out * inp for name, (out, inp) in shape.linears().items() if name in parts)
    attention = 4 * tokens * seqlen * shape.attn_width if "attention" in parts else 0
    return _mm(linears + attention, precision)


def gram_accumulation(
    widths: Iterable[int], tokens: int, precision: str = "fp32", diagonal: bool = False
) -> Work:
    """`gram.GramAccumulator.add` for linears with inputs of the given widths: 2 · tokens · width²
    each (fp32 on a GPU, fp64 on the CPU). Every hooked linear has its own accumulator, even
    when linears share their input. `diagonal` (Wanda's accumulators): square and
    sum, 2 · tokens · width, elementwise, so not what FlopCounterMode counts."""
    if diagonal:
        return _mm(sum(2 * tokens * width for width in widths), precision, counted=False)
    return _mm(sum(2 * tokens * width**2 for width in widths), precision)


def input_statistics(
    shape: LayerShape,
    names: Iterable[str],
    tokens: int,
    seqlen: int,
    compute: str,
    gram: str,
    until: Iterable[str] = (),
    diagonal: bool = False,
) -> Work:
    """`pipeline.input_statistics`: a layer forward with Gram hooks on `names` (only the
    diagonals with `diagonal`), stopped at the entry of the last of `names` and `until`."""
    names = tuple(names)
    linears = shape.linears()
    widths = [linears[name][1] for name in names]
    stop = max((*names, *until), key=FORWARD_ORDER.index)
    accumulation = gram_accumulation(widths, tokens, gram, diagonal)
    return layer_forward(shape, tokens, seqlen, compute, stop) + accumulation


def sparsegpt_linear(rows: int, cols: int, blocksize: int = 128, nm: int | None = None) -> Work:
    """`sparsegpt_prune` of a (rows, cols) weight. fp64: Cholesky (n³/3), cholesky_inverse (2n³/3)
    and the upper Cholesky of the inverse (n³/3), not counted. fp32: the rank-1 `addr_` update of
    the block's remaining columns for each column (2 · rows · remaining, not counted) and the lazy
    update of later blocks (2 · rows · block · later columns, counted). One Python iteration per
    column: SPARSEGPT_LAUNCHES_PER_COLUMN kernel launches each. `nm`: M of an N:M pattern (the
    block size is rounded down to a multiple of M, as the code does)."""
    if nm:
        blocksize = max(nm, blocksize // nm * nm)
    cholesky = _mm(4 / 3 * cols**3, "fp64", counted=False)
    rank1 = 0.0
    lazy = 0.0
    for start in range(0, cols, blocksize):
        width = min(blocksize, cols - start)
        rank1 += 2 * rows * width * (width + 1) / 2
        lazy += 2 * rows * width * (cols - start - width)
    return (
        cholesky
        + _mm(rank1, "fp32", counted=False)
        + _mm(lazy, "fp32")
        + Work(launches=cols * SPARSEGPT_LAUNCHES_PER_COLUMN)
    )


def prune_linear(pruner: str, rows: int, cols: int, blocksize: int = 128, nm: int | None = None) -> Work:
    """Pruning one weight. Magnitude and Wanda are a score and a top-k (elementwise and sorting:
    left out); SparseGPT as `sparsegpt_linear`."""
    if pruner == "sparsegpt":
        return sparsegpt_linear(rows, cols, blocksize, nm)
    if pruner in ("magnitude", "wanda"):
        return Work()
    raise ValueError(f"unknown pruner {pruner!r}")


LSQ_SOLVE_STEPS = 3  # refine._least_squares_rows: the fp32 solve and two polishing steps


def refine_linear(
    method: str, rows: int, cols: int, sparsity: float, max_swaps: int = 100, candidates: int = 16,
    nm: int | None = None,
) -> Work:
    """`pruners.refine.refine_weight` of a (rows, cols) weight. Counted products, fp64, of
    2 · rows · cols² each: the objectives Δ·H before and after, the scale W·H of tr(W H Wᵀ), and
    one residual (W − Ŵ)·H per least-squares solve step: `LSQ_SOLVE_STEPS` of them (the fp32
    solve and two fp64-residual polishing steps, the count measured on damped Grams up to
    cond 2e7; worse-conditioned chunks take more, or fp64 factors). Not counted: one fp32
    Cholesky (k³/3) per row for the k = (1 − sparsity) · cols kept weights and its two triangular
    solves (2k²) per step. Swaps add g = Δ·H (2 · rows · cols², counted) and, per swap step, the
    elementwise search (≈ 12 · rows · cols), the candidate pairs (6 · rows · candidates²; N:M:
    6 · rows · (cols / M) · kept · pruned per group) and the update of g (4 · rows · cols); the
    step count is the `max_swaps`
    bound (rows stop earlier when no swap helps)."""
    if method == "none":
        return Work()
    if method not in ("lsq", "swaps"):
        raise ValueError(f"unknown refinement {method!r}")
    kept = (1 - sparsity) * cols
    solves = _mm(rows * (kept**3 / 3 + LSQ_SOLVE_STEPS * 2 * kept**2), "fp32", counted=False)
    work = _mm((3 + LSQ_SOLVE_STEPS) * 2 * rows * cols**2, "fp64") + solves
    if method == "swaps":
        # N:M: the kept × pruned pairs of each of the cols / M groups
        per_group = (nm - sparsity * nm) * sparsity * nm if nm else 0.0
        pairs = 6 * rows * cols / nm * per_group if nm else 6 * rows * candidates**2
        step = 12 * rows * cols + pairs + 4 * rows * cols
        work = work + _mm(2 * rows * cols**2, "fp64") + _mm(max_swaps * step, "fp64", counted=False)
    return work


def prune_job(
    shape: LayerShape,
    tokens: int,
    seqlen: int,
    pruner: str,
    rotation_score: str | None,
    steps: int = 0,
    learn_r2: bool = True,
    variant: str = "paper",
    blocksize: int = 128,
    nm: int | None = None,
    compute: str = "fp32",
    gram: str = "fp32",
    matmul: str = ROTATION_MATMUL_PRECISION,
    optimizer: str = "paper",
    refine: str = "none",
    sparsity: float = 0.5,
    max_swaps: int = 100,
    candidates: int = 16,
) -> Work:
    """One rotate+prune job (`pipeline.run_pipeline`, SPEC §5) over all layers.

    Per layer (`process_layer`): with a rotation (`rotation_score` not None), Gram matrices of the
    inputs of q, o and gate (and down in the reference variant; none for magnitude),
    `rotation_training`, and the fp64 fusion (the fused products once); with a pruner ("none" =
    rotation only), per input group a Gram re-collection (unless magnitude: a layer forward up to
    the group, one Gram for the group's shared input, its diagonal for Wanda) and the pruning of
    its linears; then one forward to
    propagate the outputs (plus the entry and exit rotations h·Q, h·Qᵀ of the unmerged layer).
    `tokens` = nsamples × seqlen; `compute` and
    `gram`: precisions of the layer forward and of the Gram sums; `matmul`: of the rotation loss;
    `optimizer`: `rotation.optimizer` (`rotation_training`). `refine` (with the pattern's
    `sparsity` and the `refinement` knobs): every pruned linear refined (`refine_linear`) on its
    group's full Gram, which is then collected for Magnitude and Wanda too.
    """
    d = shape.hidden
    linears = shape.linears()
    per_layer = Work()
    rotated = rotation_score is not None
    if rotated:
        if rotation_score != "magnitude":
            needed = loss_statistic_linears(variant)
            watched = [name for name in linears if name not in needed]  # checked for inf/NaN
            per_layer = per_layer + input_statistics(shape, needed, tokens, seqlen, compute, gram, watched)
        per_layer = per_layer + rotation_training(
            shape, rotation_score, steps, learn_r2, variant, matmul, optimizer
        )
        fuse = rotation_step(shape, "magnitude", backward=False)  # the same products, once, in fp64
        per_layer = per_layer + Work({"fp64": fuse.total - qr(d, backward=False).total})
    if pruner != "none":
        for group in INPUT_GROUPS:
            if pruner != "magnitude" or refine != "none":  # one Gram per group, its first linear's
                per_layer = per_layer + input_statistics(
                    shape, group[:1], tokens, seqlen, compute, gram,
                    diagonal=pruner == "wanda" and refine == "none",
                )  # fmt: skip
            for name in group:
                per_layer = per_layer + prune_linear(pruner, *linears[name], blocksize=blocksize, nm=nm)
                per_layer = per_layer + refine_linear(
                    refine, *linears[name], sparsity, max_swaps, candidates, nm
                )
        if rotated:
            per_layer = per_layer + _mm(2 * tokens * d * d, compute)  # to_basis: h · Q
    per_layer = per_layer + layer_forward(shape, tokens, seqlen, compute)
    if rotated:
        per_layer = per_layer + _mm(2 * 2 * tokens * d * d, compute)  # RotatedLayer: in and out
    return per_layer * shape.layers


def perplexity_forward(shape: LayerShape, tokens: int, seqlen: int, precision: str = "bf16") -> Work:
    """`evaluate.perplexity`: every layer on `tokens` tokens in windows of `seqlen`, plus the lm_head
    (2 · tokens · d · vocab; 0 when `shape.vocab` is 0)."""
    head = _mm(2 * tokens * shape.hidden * shape.vocab, precision)
    return layer_forward(shape, tokens, seqlen, precision) * shape.layers + head


def zeroshot_forward(params: float, tokens: int, precision: str = "bf16") -> Work:
    """lm-eval log-likelihoods: roughly 2 · parameters · tokens scored (attention left out: short
    contexts)."""
    return _mm(2 * params * tokens, precision)


# ---------------------------------------------------------------------------------------------
# memory


# What autograd keeps per token for backward in LoRA training (peft, all seven linears, dropout,
# SDPA attention), parameters excluded, in values of the compute dtype: measured with
# torch.autograd.graph.saved_tensors_hooks on tiny Llama configs and fitted (bench/lora_memory.py;
# tests/stages/test_finetune.py re-measures an unseen shape). Per decoder layer 17.8 values per hidden
# unit and 5.0 per intermediate unit; with gradient checkpointing only the layer's input (1 value
# per hidden unit); the logits: 1 fp32 value per vocabulary entry.
LORA_SAVED_PER_HIDDEN = 17.8
LORA_SAVED_PER_INTERMEDIATE = 5.0
LORA_ADAPTER_BYTES_PER_PARAMETER = 16  # fp32 value, gradient, Adam's two moments


LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


def lora_parameters(shape: LayerShape, rank: int, targets: Iterable[str] = LORA_TARGETS) -> int:
    """Trainable LoRA parameters: rank · (in + out) per adapted linear and layer."""
    linears = shape.linears()
    return shape.layers * rank * sum(sum(linears[name]) for name in targets)


def lora_saved_bytes(
    shape: LayerShape, tokens: int, itemsize: int, checkpointing: bool, vocab: int | None = None
) -> float:
    """What autograd keeps for backward in one LoRA micro-batch of `tokens` tokens: every layer's
    saved activations (or, with `checkpointing`, each layer's input), the embedding output and the
    fp32 logits; parameters excluded."""
    layer = LORA_SAVED_PER_HIDDEN * shape.hidden + LORA_SAVED_PER_INTERMEDIATE * shape.intermediate
    kept = shape.layers * (shape.hidden if checkpointing else layer) + shape.hidden
    return tokens * (kept * itemsize + 4 * (shape.vocab if vocab is None else vocab))


def lora_activation_bytes(
    shape: LayerShape, tokens: int, itemsize: int, checkpointing: bool, vocab: int | None = None
) -> float:
    """Peak activation memory of one LoRA micro-batch: `lora_saved_bytes` plus one layer's worth in
    flight during backward (its activation gradients, or its recomputation with checkpointing)."""
    layer = LORA_SAVED_PER_HIDDEN * shape.hidden + LORA_SAVED_PER_INTERMEDIATE * shape.intermediate
    return lora_saved_bytes(shape, tokens, itemsize, checkpointing, vocab) + tokens * layer * itemsize


def rotation_memory_bytes(shape: LayerShape, score: str) -> int:
    """Estimated peak device memory of `train_rotation` on one layer, fp32: the frozen weights,
    what autograd keeps per linear for backward (fused weight, scores, weighted scores,
    probabilities, their clamp and log: 6 copies; 5 for magnitude without the score weighting)
    and two transient gradient-sized buffers, plus the d×d matrices (free, Q, statistics, Adam).
    An estimate: bench/gpu_check.py measures it."""
    saved = 5 if score == "magnitude" else 6
    weights = shape.layer_params * 4 * (1 + saved + 2)
    squares = 4 * 12 * shape.hidden**2 + 4 * 6 * shape.attn_width**2
    return int(weights + squares)


# ---------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class Device:
    """A device's documented peak rate per precision (TFLOP/s, dense, no 2:4 sparsity) and the
    fraction of it the pipeline's kernels are assumed to reach; launch latency in µs."""

    name: str
    peak_tflops: Mapping[str, float]
    efficiency: Mapping[str, float]
    launch_us: float
    source: str
    memory_gib: float = 80.0  # one GPU's memory (the A100 the profile asks for: the 80 GB model)

    def rate(self, precision: str, threads: int = 1) -> float:
        """Achievable FLOP/s for `precision` (CPU rates are per thread)."""
        per_unit = self.peak_tflops[precision] * 1e12 * self.efficiency[precision]
        return per_unit * (threads if self.name == "cpu" else 1)


# Achievable fractions: large fp32/TF32/bf16 GEMMs reach 70–80 % of peak in cuBLAS; the rotation
# step's products are 4096–28672 wide, so 0.7 (0.6 for TF32, whose peak is harder to reach); fp64
# Cholesky in cuSOLVER ~0.5 of the FP64 tensor-core peak. Checked by bench/gpu_check.py.
_GPU_EFFICIENCY = {"fp64": 0.5, "fp32": 0.7, "tf32": 0.6, "bf16": 0.6}
DEVICES: dict[str, Device] = {
    "a100": Device(
        "a100",
        {"fp64": 19.5, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
        _GPU_EFFICIENCY,
        launch_us=10.0,
        source="NVIDIA A100 datasheet (SXM): FP64 tensor core 19.5, FP32 19.5, TF32 156, BF16 312 TFLOPS",
    ),
    "h100": Device(
        "h100",
        {"fp64": 67.0, "fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
        _GPU_EFFICIENCY,
        launch_us=8.0,
        source="NVIDIA H100 datasheet (SXM): FP64 tensor core 67, FP32 67, TF32 495, BF16 989 TFLOPS",
    ),
    "h200": Device(
        "h200",
        {"fp64": 67.0, "fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
        _GPU_EFFICIENCY,
        launch_us=8.0,
        source="NVIDIA H200 datasheet (SXM): same compute as H100 SXM, more and faster memory",
        memory_gib=141.0,
    ),
    # Per thread: an AVX2 core with two FMA units at ~3 GHz peaks at 96 GFLOP/s fp32; PyTorch's
    # BLAS reaches about a third. fp64 half of that; bf16 has no fast path on most CPUs.
    "cpu": Device(
        "cpu",
        {"fp64": 0.048, "fp32": 0.096, "tf32": 0.096, "bf16": 0.096},
        {"fp64": 0.3, "fp32": 0.3, "tf32": 0.3, "bf16": 0.1},
        launch_us=2.0,
        source="assumption: AVX2 core, 2 FMA × 8 fp32 lanes × 3 GHz; 1/3 of peak reached",
        memory_gib=0.0,
    ),
}


def device_for(name: str | None) -> Device:
    """The table entry for a GPU model name ("a100", "NVIDIA H100 80GB HBM3", "cpu", ...);
    unknown or empty names get the A100 (the slowest GPU in the table, so requests stay safe).
    A name that states 40 GB ("a100-40g", "A100-SXM4-40GB") gets that memory."""
    import dataclasses
    import re

    lowered = (name or "").lower()
    device = next((d for key, d in DEVICES.items() if key in lowered), DEVICES["a100"])
    stated = re.search(r"(\d+)\s*g(?:i?b)?\b", lowered)
    if stated and device.name != "cpu":
        return dataclasses.replace(device, memory_gib=float(stated.group(1)))
    return device


def seconds(work: Work, device: Device, threads: int = 1) -> float:
    """Time of `work` on `device`: FLOPs per precision over the achievable rate, plus launches ×
    launch latency. Memory traffic of elementwise work is not modelled (a few % of a rotation step)."""
    compute = sum(flops / device.rate(precision, threads) for precision, flops in work.flops.items())
    return compute + work.launches * device.launch_us * 1e-6


def precision_of(dtype: str) -> str:
    """Arithmetic precision of a compute dtype name ("float32" → fp32; bf16/fp16 → bf16 rate)."""
    return {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "bf16"}[dtype]


def format_flops(value: float) -> str:
    if value <= 0:
        return "0 FLOP"
    exponent = min(int(math.log10(value) // 3), 5)
    unit = ["", "k", "M", "G", "T", "P"][exponent]
    return f"{value / 10 ** (3 * exponent):.3g} {unit}FLOP"
