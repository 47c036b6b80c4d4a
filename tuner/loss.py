"""Causal-LM cross-entropy that never holds the whole (tokens x vocab) logits.

Gemma 3 has a 262,144-token vocabulary, so the standard loss materialises 1 GiB of fp32 logits per
1,024 tokens, then a log-softmax and two gradients of the same size. Here the lm_head projection and
the cross-entropy run chunk by chunk over the tokens, so at most (chunk x vocab) logits exist at a
time. The gradients of each chunk are computed in the same pass as its loss (as liger-kernel does),
not recomputed in backward: recomputing would cost one more (tokens x hidden x vocab) matmul, which
on the 270M model is about a fifth of a training step, for no saving in peak memory (the
(vocab x hidden) weight gradient has to exist in backward either way).

The result equals transformers' ForCausalLMLoss: labels shifted by one, -100 ignored, the sum
divided by `num_items_in_batch` when the Trainer passes it (exact gradient accumulation), else the
mean over the counted tokens.
"""

from __future__ import annotations

import torch

from tuner.common import IGNORE_INDEX  # noqa: F401  (the loss modules and tests use loss.IGNORE_INDEX)

# Bytes of fp32 logits one chunk may hold; 256 tokens for Gemma 3's vocabulary. Smaller chunks
# save little (the weight gradient alone is 640 MiB) and make the matmuls less efficient.
CHUNK_BYTES = 256 * 2**20
_LIGER_HINT = "pip install liger-kernel"


def liger_problem(cuda_available: bool, installed: bool) -> str | None:
    """Why `--use_liger_kernel` cannot run here, or None when it can."""
    if not cuda_available:
        return "liger-kernel's fused cross-entropy is a Triton kernel and needs a CUDA GPU; drop --use_liger_kernel on CPU"
    if not installed:
        return f"--use_liger_kernel needs liger-kernel: {_LIGER_HINT}"
    return None


def default_chunk_size(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def compute_causal_lm_loss(
    model, inputs: dict, num_items_in_batch=None, use_liger: bool = False, chunk_size: int | None = None, head_hook=None,
    label_smoothing: float = 0.0,
):
    """Loss of a (possibly DDP/accelerate-wrapped) causal LM; returns (loss, outputs).

    The forward goes through `model` itself so wrapper hooks (DDP gradient sync) fire, but asks for
    no logits: `outputs.logits` is empty, (B, 0, V).

    `head_hook` (influence scoring, see influence.py) is told the flat (B*T) positions of the counted
    tokens, sees each chunk's hidden states and logit gradients, and gets the summed loss tensor.

    `label_smoothing` (epsilon) gives each token the loss (1 - epsilon) * CE + epsilon * (the mean over the
    vocabulary of -log p), as transformers' LabelSmoother (--label_smoothing_factor) does.
    """
    head, softcap = _output_head(model)
    labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
    if labels is None and shift_labels is None:
        raise ValueError("compute_causal_lm_loss needs inputs['labels'] (or already shifted inputs['shift_labels'])")
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    no_positions = torch.empty(0, dtype=torch.long, device=head.weight.device)
    outputs = model(**model_inputs, logits_to_keep=no_positions, output_hidden_states=True, use_cache=False)
    # transformers replaces hidden_states[-1] by last_hidden_state, i.e. after the final norm:
    # exactly what lm_head would have received.
    hidden = outputs.hidden_states[-1]  # (B, T, H)
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    targets = shift_labels.reshape(-1).to(hidden.device)  # (B*T,)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # ignored tokens cost nothing
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (N, H)
    targets = targets.index_select(0, rows)  # (N,)
    if use_liger:
        if head_hook is not None:
            raise ValueError("Liger's fused loss never exposes the logit gradients that head_hook needs")
        loss_sum = _liger_loss_sum(head.weight, hidden, targets, softcap, label_smoothing)
    else:
        chunk_hook = None if head_hook is None else head_hook.bind(rows)
        loss_sum = chunked_cross_entropy_sum(hidden, head.weight, targets, softcap, chunk_size, chunk_hook, label_smoothing)
        if head_hook is not None:
            head_hook.watch(loss_sum)
    if num_items_in_batch is None:
        return loss_sum / rows.numel(), outputs  # nan when nothing is counted, as transformers
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch, outputs


def _output_head(model) -> tuple[torch.nn.Linear, float | None]:
    from accelerate.utils import extract_model_from_parallel

    unwrapped = extract_model_from_parallel(model)
    head = unwrapped.get_output_embeddings()
    config = unwrapped.config
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("the chunked loss supports an lm_head without bias only")
    expected = (config.vocab_size, config.hidden_size)
    if tuple(head.weight.shape) != expected:
        # An FSDP/DeepSpeed-sharded head is not whole outside the forward.
        raise NotImplementedError(f"lm_head weight is {tuple(head.weight.shape)}, not {expected}: sharded heads are not supported")
    return head, getattr(config, "final_logit_softcapping", None)


def chunked_cross_entropy_sum(
    hidden, weight, targets, softcap=None, chunk_size=None, chunk_hook=None, smoothing: float = 0.0
) -> torch.Tensor:
    """Sum over rows of -log softmax(softcap(hidden @ weight.T))[target]; hidden (N, H), weight (V, H).

    Differentiable in `hidden` and `weight`; `targets` (N,) must already exclude ignored rows.
    `chunk_hook(start, h, grad_logits)`, when given, sees every chunk of rows start.. of the gradient
    pass: h (c, H) and d(sum)/d(logits) (c, V), softcapping included.
    """
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk_size, chunk_hook, smoothing)
    return _loss_and_grads(hidden, weight, targets, softcap, chunk_size, (False, False), None, smoothing)[0]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, chunk_hook, smoothing=0.0):
        # A frozen head (e.g. LoRA) skips the weight gradient: a third of the matmuls and 640 MiB.
        need = ctx.needs_input_grad[:2]
        loss_sum, grad_hidden, grad_weight = _loss_and_grads(
            hidden, weight, targets, softcap, chunk_size, need, chunk_hook, smoothing
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.backward_done = False
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        # The loss is a scalar and the stored gradients are d(loss_sum); the chain rule only scales
        # them. In place, because a scaled copy of the (V, H) weight gradient would be 640 MiB more.
        if ctx.backward_done:
            raise RuntimeError("the chunked loss supports one backward per forward (no retain_graph reuse)")
        ctx.backward_done = True
        grads = ctx.saved_tensors  # (N, H) and (V, H), either None when not needed
        if not bool(grad_loss == 1):
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.dtype))
        return *grads, None, None, None, None, None


def _loss_and_grads(hidden, weight, targets, softcap, chunk_size, need: tuple[bool, bool], chunk_hook=None, smoothing=0.0):
    """Loss sum and the gradients asked for by `need`: wrt hidden (N, H), wrt weight (V, H)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    # At least fp32: summing thousands of chunk contributions in bf16 would lose the small ones.
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, y = hidden[rows], targets[rows]  # (c, H), (c,)
        chunk_loss, grad_logits = _chunk_loss(h @ weight.T, y, softcap, any(need), smoothing)  # logits (c, V)
        loss_sum += chunk_loss
        if grad_hidden is not None:  # grad_logits (c, V) is in the accumulation dtype
            grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, h.to(acc))
        if chunk_hook is not None and grad_logits is not None:
            chunk_hook(start, h, grad_logits)
        del grad_logits  # else it lives on beside the next chunk's logits: a second (c, V) buffer
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, grad_hidden, grad_weight


def _chunk_loss(logits, targets, softcap, with_grads, smoothing=0.0):
    """Summed cross-entropy of one chunk of logits (c, V), and d(sum)/d(logits) (c, V) if asked.
    With label smoothing epsilon, each row's loss is lse - (1 - epsilon) z_target - epsilon mean(z)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as transformers' .float()
    if softcap is not None:
        # Gemma's final_logit_softcapping: cap * tanh(logits / cap), as in the model's forward.
        squashed = logits.div_(softcap).tanh_()  # in place: the raw logits are not needed again
        logits = squashed * softcap
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)  # (c,)
    if smoothing:
        target_logits = (1 - smoothing) * target_logits + smoothing * logits.mean(dim=-1)
    # logsumexp by hand, in place: torch.logsumexp would allocate another (c, V) temporary.
    row_max = logits.amax(dim=-1, keepdim=True)  # (c, 1)
    exps = logits.sub_(row_max).exp_()  # (c, V), the logits buffer reused
    sums = exps.sum(dim=-1, keepdim=True)  # (c, 1)
    loss = (row_max.squeeze(1) + sums.log().squeeze(1) - target_logits).sum()
    if not with_grads:
        return loss, None
    # d(loss)/d(logits) = softmax - onehot, still in the same buffer.
    grad = exps.div_(sums)
    grad[torch.arange(targets.shape[0], device=grad.device), targets] -= 1 - smoothing
    if smoothing:
        grad.sub_(smoothing / grad.shape[-1])
    if softcap is not None:
        grad.mul_(squashed.square_().neg_().add_(1))  # d(cap*tanh(x/cap))/dx = 1 - tanh^2
    return loss, grad


def _liger_loss_sum(weight, hidden, targets, softcap, smoothing: float = 0.0) -> torch.Tensor:
    """liger-kernel's fused Triton kernel: the same chunked idea, faster on CUDA."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        raise ImportError(f"--use_liger_kernel needs liger-kernel: {_LIGER_HINT}") from error
    # "sum" so the caller divides by num_items_in_batch or the count, as for the chunked loss.
    loss_fn = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap, label_smoothing=smoothing
    )
    return loss_fn(weight, hidden, targets)
