"""Hugging Face model classes for DenoiseRotator models with merged boundary rotations.

After DenoiseRotator every decoder layer i runs in its own orthogonal basis. With the
adjacent exit/entry rotations merged (SPEC §2), the hidden state entering layer i must be
multiplied on the right by one d×d matrix M_i = Q_{i-1}ᵀ Q_i. This file adds exactly that to
the stock Llama / Qwen2 / Mistral / Qwen3 / Phi-3 / Gemma 3 classes: a small submodule holding
M_i (a parameter, so it is saved and loaded with the state dict) and a forward pre-hook on
the decoder layer that applies it. Gemma 3 also gets its sublayer-output norms as d×d matrices
(`RotatedOutputNorm`). No Hugging Face forward code is copied, so the classes follow whatever
transformers version runs them.

This file is self-contained (torch and transformers only): it is copied verbatim into every
exported model folder, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
(and therefore lm-eval, or any HF-based tool) loads the model without the denoiserotator package.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

# Name of the submodule on a decoder layer and of the config key listing the layers that carry one.
BOUNDARY_ATTR = "denoiserotator_boundary"
CONFIG_KEY = "denoiserotator_boundary_layers"
_HANDLE_ATTR = "_denoiserotator_boundary_hook"
# Config key listing the layers whose sublayer-output norms carry a d×d matrix (Gemma 3).
OUTPUT_NORM_KEY = "denoiserotator_output_norm_layers"
BLOCKS_KEY = "denoiserotator_boundary_blocks"
MAX_BLOCKS = 64  # block-diagonal R1 (`rotation.r1_blocks`): more blocks than this are not looked for


class BoundaryRotation(nn.Module):
    """Right-multiplies the hidden state by a fixed d×d matrix (identity until loaded or set).
    With `blocks` > 1 the matrix is block-diagonal (block-diagonal R1) and is applied block by
    block: d²/blocks multiply-adds per token instead of d²."""

    def __init__(
        self, hidden_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ):
        super().__init__()
        # A frozen parameter rather than a buffer: parameters are what HF checkpoints always
        # save and what strict loading reports when missing.
        self.weight = nn.Parameter(torch.eye(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.blocks = 1

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # In the matrix's precision (fp32 for bf16/fp16 models): an orthogonal matrix rounded to
        # bf16 is visibly non-orthogonal, and the error would compound over the layers.
        # On the matrix's device: under accelerate's device_map this pre-hook runs before the
        # layer's own hook moves its inputs, so the hidden state may still be on the previous GPU.
        states = hidden_states.to(device=self.weight.device, dtype=self.weight.dtype)
        if self.blocks == 1:
            return (states @ self.weight).to(hidden_states.dtype)
        size = self.weight.shape[0] // self.blocks
        diagonal = self.weight.view(self.blocks, size, self.blocks, size).diagonal(dim1=0, dim2=2)
        split = states.reshape(*states.shape[:-1], self.blocks, size)
        rotated = torch.einsum("...bi,ijb->...bj", split, diagonal)
        return rotated.reshape(states.shape).to(hidden_states.dtype)


def block_count(matrix: torch.Tensor, limit: int = MAX_BLOCKS) -> int:
    """The most equal diagonal blocks (≤ `limit`) outside which `matrix` is exactly zero."""
    size = matrix.shape[0]
    # one pass over the matrix: each row's first and last nonzero column; a block count fits when
    # both lie in the row's own block (an all-zero row fits any)
    nonzero = matrix != 0
    columns = torch.arange(size, device=matrix.device)
    first = torch.where(nonzero, columns, size).min(dim=1).values
    last = torch.where(nonzero, columns, -1).max(dim=1).values
    empty = ~nonzero.any(dim=1)
    for blocks in range(min(limit, size), 1, -1):
        if size % blocks:
            continue
        width = size // blocks
        own = columns // width
        if bool((empty | ((first // width == own) & (last // width == own))).all()):
            return blocks
    return 1


class RotatedOutputNorm(nn.Module):
    """An RMSNorm whose scale became a d×d matrix: y = (x / RMS(x)) @ weight, in fp32.

    A norm applied to a sublayer's output before the residual add (Gemma's post norms) receives
    the rotated yQ once the residual stream is rotated by Q. RMS is rotation-invariant, so the
    original norm(y)·Q equals (yQ / RMS(yQ)) @ Qᵀ·diag(s)·Q with s its elementwise scale: exact,
    at one extra d×d product per token. The matrix keeps the norm's parameter name (`weight`),
    so a stock class's load report flags the size mismatch instead of loading it as a scale.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        # at least fp32 (bf16 models keep it fp32, as the boundary matrices)
        dtype = torch.promote_types(dtype or torch.float32, torch.float32)
        self.weight = nn.Parameter(torch.eye(hidden_size, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_norm(cls, norm: nn.Module, rotation: torch.Tensor, offset: float) -> RotatedOutputNorm:
        """From an RMSNorm with scale `offset + norm.weight` and the residual rotation Q (d×d)."""
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        scale = norm.weight.detach().to(torch.float64) + offset
        q64 = rotation.to(device=scale.device, dtype=torch.float64)
        rotated = cls(scale.numel(), eps, dtype=norm.weight.dtype, device=norm.weight.device)
        with torch.no_grad():
            rotated.weight.copy_((q64.T * scale[None, :]) @ q64)
        return rotated

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # at least fp32, as the norm it replaces computes
        x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed @ self.weight.to(device=x.device, dtype=x.dtype)).type_as(hidden_states)


def _boundary_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    rotation = getattr(module, BOUNDARY_ATTR)
    if args:
        return (rotation(args[0]), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = rotation(kwargs["hidden_states"])
    return args, kwargs


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule("model.layers")


def _remove_boundary(layer: nn.Module) -> None:
    handle = getattr(layer, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(layer, _HANDLE_ATTR)
    if hasattr(layer, BOUNDARY_ATTR):
        delattr(layer, BOUNDARY_ATTR)


def _add_boundary(layer: nn.Module, hidden_size: int, like: torch.Tensor) -> BoundaryRotation:
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    rotation = BoundaryRotation(hidden_size, dtype=dtype, device=like.device)
    layer.add_module(BOUNDARY_ATTR, rotation)
    # prepend=True: the rotation must act before any other pre-hook (e.g. Gram collectors)
    # sees the layer's input, so those see exactly what the layer computes with.
    setattr(
        layer,
        _HANDLE_ATTR,
        layer.register_forward_pre_hook(_boundary_pre_hook, with_kwargs=True, prepend=True),
    )
    return rotation


def _set_boundary_layers(model: nn.Module, boundary: dict[int, torch.Tensor | None]) -> None:
    """Give exactly the layers in `boundary` a rotation (None = identity placeholder); drop the others.
    Block-diagonal matrices (block-diagonal R1) are recorded as such (`BLOCKS_KEY`) and applied
    block by block; placeholders take the count the config records (a model being loaded)."""
    layers = _decoder_layers(model)
    hidden_size = int(model.config.hidden_size)
    like = model.get_input_embeddings().weight
    given = [m for m in boundary.values() if m is not None]
    if given:
        blocks = min(block_count(m) for m in given)
        if blocks > 1:
            setattr(model.config, BLOCKS_KEY, blocks)
        elif hasattr(model.config, BLOCKS_KEY):
            delattr(model.config, BLOCKS_KEY)
    else:
        blocks = int(getattr(model.config, BLOCKS_KEY, 1) or 1)
    for index, layer in enumerate(layers):
        _remove_boundary(layer)
        if index not in boundary:
            continue
        rotation = _add_boundary(layer, hidden_size, like)
        matrix = boundary[index]
        if matrix is not None:
            if tuple(matrix.shape) != (hidden_size, hidden_size):
                raise ValueError(
                    f"boundary[{index}] has shape {tuple(matrix.shape)}, expected {hidden_size}²"
                )
            with torch.no_grad():
                rotation.weight.copy_(matrix.to(device=rotation.weight.device, dtype=rotation.weight.dtype))
        rotation.blocks = blocks
    setattr(model.config, CONFIG_KEY, sorted(boundary))


def _output_norm_layers(model: nn.Module) -> list[int]:
    # by class name: a class loaded through trust_remote_code is a copy of this file's
    return [
        index
        for index, layer in enumerate(_decoder_layers(model))
        if any(type(module).__name__ == RotatedOutputNorm.__name__ for module in layer.modules())
    ]


class DenoiseRotatorBoundaryMixin:
    """Adds the boundary rotations listed in `config.denoiserotator_boundary_layers`."""

    _denoiserotator_rotated = True
    # Loading with dtype=bfloat16/float16 keeps the boundary matrices in fp32 (see BoundaryRotation).
    _keep_in_fp32_modules_strict = [BOUNDARY_ATTR]
    # the family's sublayer-output norms (Gemma 3), made RotatedOutputNorm in the listed layers
    _denoiserotator_output_norms: tuple[str, ...] = ()

    def _denoiserotator_init(self) -> None:
        indices = [int(i) for i in (getattr(self.config, CONFIG_KEY, None) or [])]
        num_layers = len(_decoder_layers(self))
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{CONFIG_KEY} lists layers {bad} but the model has {num_layers} layers")
        _set_boundary_layers(self, {i: None for i in indices})
        layers = _decoder_layers(self)
        for index in [int(i) for i in (getattr(self.config, OUTPUT_NORM_KEY, None) or [])]:
            for path in self._denoiserotator_output_norms:
                parent, _, child = path.rpartition(".")
                owner = layers[index].get_submodule(parent) if parent else layers[index]
                norm = getattr(owner, child)
                size, device = norm.weight.numel(), norm.weight.device
                setattr(owner, child, RotatedOutputNorm(size, float(norm.eps), norm.weight.dtype, device))


class RotatedLlamaForCausalLM(DenoiseRotatorBoundaryMixin, LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._denoiserotator_init()


class RotatedQwen2ForCausalLM(DenoiseRotatorBoundaryMixin, Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._denoiserotator_init()


class RotatedMistralForCausalLM(DenoiseRotatorBoundaryMixin, MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._denoiserotator_init()


class RotatedQwen3ForCausalLM(DenoiseRotatorBoundaryMixin, Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._denoiserotator_init()


class RotatedPhi3ForCausalLM(DenoiseRotatorBoundaryMixin, Phi3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._denoiserotator_init()


class RotatedGemma3ForCausalLM(DenoiseRotatorBoundaryMixin, Gemma3ForCausalLM):
    _denoiserotator_output_norms = ("post_attention_layernorm", "post_feedforward_layernorm")
    _keep_in_fp32_modules_strict = [BOUNDARY_ATTR, *_denoiserotator_output_norms]

    def __init__(self, config):
        super().__init__(config)
        self._denoiserotator_init()


ROTATED_CLASSES: dict[type[PreTrainedModel], type[PreTrainedModel]] = {
    LlamaForCausalLM: RotatedLlamaForCausalLM,
    Qwen2ForCausalLM: RotatedQwen2ForCausalLM,
    MistralForCausalLM: RotatedMistralForCausalLM,
    Qwen3ForCausalLM: RotatedQwen3ForCausalLM,
    Phi3ForCausalLM: RotatedPhi3ForCausalLM,
    Gemma3ForCausalLM: RotatedGemma3ForCausalLM,
}


def is_rotated(model: nn.Module) -> bool:
    # Duck-typed: a class loaded through trust_remote_code comes from a copy of this file,
    # so it is a different class object than the ones above.
    return bool(getattr(type(model), "_denoiserotator_rotated", False))


def plain_class(model: nn.Module) -> type[PreTrainedModel]:
    """The stock transformers class a (possibly rotated) model derives from."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models.") and issubclass(cls, PreTrainedModel):
            return cls
    raise TypeError(f"{type(model).__name__} does not derive from a transformers model class")


def rotated_class_for(model: nn.Module) -> type[PreTrainedModel]:
    base = plain_class(model)
    for plain, rotated in ROTATED_CLASSES.items():
        if base is plain:
            return rotated
    supported = ", ".join(cls.__name__ for cls in ROTATED_CLASSES)
    raise TypeError(f"no rotated class for {base.__name__}; supported: {supported}")


def attach_boundary_rotations(model: PreTrainedModel, boundary: list[torch.Tensor | None]) -> PreTrainedModel:
    """Turn `model` (in place) into its Rotated* class carrying `boundary` and return it.

    boundary[i] is the matrix M_i with which the hidden state entering decoder layer i is
    right-multiplied (`h @ M_i`); None means identity and adds no module. Calling it again
    replaces the previous rotations.
    """
    layers = _decoder_layers(model)
    if len(boundary) != len(layers):
        raise ValueError(f"boundary has {len(boundary)} entries but the model has {len(layers)} layers")
    if not is_rotated(model):
        model.__class__ = rotated_class_for(model)
    _set_boundary_layers(model, {i: m for i, m in enumerate(boundary) if m is not None})
    output_norms = _output_norm_layers(model)
    if output_norms:
        setattr(model.config, OUTPUT_NORM_KEY, output_norms)
    return model


def get_boundary_rotations(model: nn.Module) -> list[torch.Tensor | None]:
    """The matrices a model applies at its layer boundaries (None where it applies none)."""
    return [
        getattr(layer, BOUNDARY_ATTR).weight.detach().clone() if hasattr(layer, BOUNDARY_ATTR) else None
        for layer in _decoder_layers(model)
    ]
