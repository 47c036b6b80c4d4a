"""The per-token half of influence scoring: hooks that score every token of a micro-batch in its backward.

For a module applied position by position, y_t = f(x_t; theta), the gradient of a loss L is
sum_t J_t^T g_t (g_t = dL/dy_t, J_t = dy_t/dtheta), so its dot product with a fixed direction
theta_val splits over tokens: <grad L, theta_val> = sum_t g_t . (J_t theta_val). Summing the terms of
one example's tokens gives that example's score without forming its gradient (the "ghost" dot product
of In-Run Data Shapley). Per module kind, matched by capability rather than class (Gemma's embedding
and norm are classes of their own):

- linear, y = x W^T (+ b): J_t theta_val = W_val x_t (+ b_val), so a token's term is (g_t W_val) . x_t:
  one matmul the size of the backward's grad-input one, instead of a (out x in) gradient per example.
- embedding (an nn.Embedding subclass) and elementwise modules (every trainable parameter 1-D, as in
  norms): J_t theta_val is the module's forward-mode derivative (jvp) in the direction theta_val.
  Exact whatever the formula (Gemma's sqrt(hidden) embedding scale, its (1 + w) RMSNorm), and cheap:
  no matmul, a few elementwise passes over the activations.

The scoring runs in the backward of `_Tap`, an identity put on the module's output. Its saved input
is an ordinary saved tensor, so it lives exactly as long as autograd keeps the module's own saved
input: under gradient checkpointing it is dropped after the forward and recomputed with the rest,
and only the graph that is really backpropagated fires its taps, so each token is scored once.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.autograd import forward_ad

LINEAR, EMBEDDING, ELEMENTWISE = "linear", "embedding", "elementwise"


def trainable_direct(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def module_kind(module: torch.nn.Module) -> str | None:
    """How a module with trainable parameters of its own is scored; None when it cannot be exactly."""
    params = trainable_direct(module)
    if isinstance(module, torch.nn.Linear):
        return LINEAR
    if isinstance(module, torch.nn.Embedding):
        # max_norm renormalises rows in the forward and sparse gradients skip the dense path: neither
        # is the plain lookup whose jvp we take.
        return EMBEDDING if module.max_norm is None and not module.sparse else None
    if params and all(p.dim() == 1 for p in params.values()):
        return ELEMENTWISE
    return None


def token_grid(scores: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-position scores of a module, (B, ..., T) or (B*T,), summed to (B, T) tokens.

    Modules see tokens as (B, T, D) inputs, or (B, heads, T, D) for Gemma's per-head q/k norms.
    """
    batch, length = shape
    if scores.dim() >= 2 and scores.shape[0] == batch and scores.shape[-1] == length:
        return scores.sum(dim=tuple(range(1, scores.dim() - 1))) if scores.dim() > 2 else scores
    if scores.numel() == batch * length:
        return scores.reshape(batch, length)
    raise RuntimeError(f"influence: a module's input has positions {tuple(scores.shape)}, not the micro-batch's (B, T) = {shape}")


class _Tap(torch.autograd.Function):
    """Identity on a module's output; its backward hands (module input, output gradient) to `score`."""

    @staticmethod
    def forward(ctx, output, module_input, score):
        ctx.save_for_backward(module_input)
        ctx.score = score
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (module_input,) = ctx.saved_tensors
        ctx.score(module_input, grad_output)
        return grad_output, None, None  # the gradient passes unchanged: training is untouched


class ModuleTaps:
    """Forward hooks on every module with trainable parameters of its own; they act only while armed.

    `directions` maps each trainable parameter to its reference-set gradient (theta_val). While
    `tokens` (a (B, T) float64 tensor) is set, each scored module adds its per-token terms to it,
    computed from the gradient that reaches the module's output, i.e. still carrying the loss scale.
    """

    def __init__(self, model: torch.nn.Module):
        self.kinds = {m: module_kind(m) for m in model.modules() if trainable_direct(m)}
        unsupported = [type(m).__name__ for m, kind in self.kinds.items() if kind is None]
        if unsupported:
            raise ValueError(f"influence cannot score the trainable parameters of {', '.join(sorted(set(unsupported)))} exactly")
        self.handles = [m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self.kinds]
        self.directions: dict[torch.Tensor, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None
        self._in_jvp = False

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _forward_hook(self, module, args, kwargs, output):
        if self.tokens is None or self._in_jvp or not torch.is_grad_enabled():
            return None
        if not torch.is_tensor(output) or not output.requires_grad:
            return None
        module_input = args[0] if args else next(iter(kwargs.values()))
        if module_input.numel() == 0:  # e.g. lm_head asked for no positions: the chunked loss scores the head
            return None
        # Detached: the tap needs the values, not a graph edge to the input's producer.
        return _Tap.apply(output, module_input.detach(), partial(self._score, module))

    def _score(self, module, module_input, grad_output) -> None:
        if self.kinds[module] == LINEAR:
            scores = self._linear(module, module_input, grad_output)
        else:
            scores = self._jvp(module, module_input, grad_output)
        self.tokens += token_grid(scores, tuple(self.tokens.shape)).to(self.tokens.dtype)

    def _linear(self, module, x, g):
        """(..., ) scores of y = x W^T + b: (g W_val) . x + g . b_val, per position."""
        acc = torch.promote_types(g.dtype, torch.float32)
        scores = torch.zeros(g.shape[:-1], dtype=acc, device=g.device)
        if module.weight.requires_grad:
            scores += (g @ self.directions[module.weight].to(g.dtype)).mul_(x.to(g.dtype)).sum(-1, dtype=acc)
        if module.bias is not None and module.bias.requires_grad:
            scores += (g * self.directions[module.bias].to(g.dtype)).sum(-1, dtype=acc)
        return scores

    def _jvp(self, module, x, g):
        """g . (d module(x) / d theta) theta_val per position, by forward-mode differentiation."""
        params = trainable_direct(module)
        self._in_jvp = True  # functional_call runs the module's forward, hooks included
        try:
            with forward_ad.dual_level():
                duals = {name: forward_ad.make_dual(p.detach(), self.directions[p]) for name, p in params.items()}
                tangent = forward_ad.unpack_dual(torch.func.functional_call(module, duals, (x,))).tangent
        finally:
            self._in_jvp = False
        scores = (g * tangent.to(g.dtype)).sum(-1, dtype=torch.promote_types(g.dtype, torch.float32))
        if self.kinds[module] == EMBEDDING and module.padding_idx is not None:
            # nn.Embedding's backward gives the padding row no gradient; its jvp would still read that row.
            scores = scores.masked_fill(x == module.padding_idx, 0)
        return scores
