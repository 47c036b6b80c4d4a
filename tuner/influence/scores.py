"""Which training examples help the reference set and which hurt: per-example scores inside the training step.

For every example i of a scored micro-batch, score_i = < grad l_i, grad L_val >, over all trainable
parameters, at the weights the optimizer step starts from (TracIn's term; influence is the sum over
steps of learning_rate x score). l_i is example i's mean loss over its trained tokens: an example
is a row, or in a packed row the positions t carrying its id, each predicting labels[t + 1] (a
packer masks the label that crosses into the next example). L_val is the mean loss over all trained
tokens of the reference batches. The loss's scaling (num_items_in_batch, the Trainer's division by
accumulation steps or multiplication by the world size) is read off the backward and removed.

Cost per scored optimizer step: one forward and backward of the reference set (its gradient, W_val,
one copy of the trainable parameters), and per training token one extra matmul per scored linear
layer and per output-head chunk (the size of the backward's grad-input matmul: about a third more
matmul work), see influence_hooks.py. Per-example gradients are never formed.

Use from a training loop (a Trainer subclass does the same from training_step and compute_loss):

    scorer = InfluenceScorer(model, reference_batches, preconditioner="none")
    scorer.refresh(step, optimizer)            # first micro-batch of a step computes W_val
    with scorer.scoring(inputs, example_ids):  # example_ids (B, T) for packed rows, else None
        loss, _ = compute_causal_lm_loss(model, inputs, num_items, head_hook=scorer.head_hook)
        (loss / accumulation).backward()       # any scaling: scores do not depend on it
    scorer.result                              # ExampleScores of this micro-batch
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tuner.common import IGNORE_INDEX
from tuner.influence.hooks import ModuleTaps, module_kind, trainable_direct
from tuner.loss import compute_causal_lm_loss

PRECONDITIONERS = ("none", "adam")


def config_problem(use_liger_kernel: bool, sharded: bool) -> str | None:
    """Why influence scores cannot be exact with these settings, or None; for the validation step."""
    if use_liger_kernel:
        return ("Liger's fused loss computes the output head's gradient inside its kernel and never exposes the "
                "per-token logit gradients the head's scores need; drop --use_liger_kernel")  # fmt: skip
    if sharded:
        return ("FSDP and DeepSpeed keep each layer's weights sharded across processes, where the per-token scores "
                "need a layer's whole reference gradient; use plain data parallelism (DDP)")  # fmt: skip
    return None


def model_problem(model: torch.nn.Module) -> str | None:
    """Why some trainable parameters of `model` cannot be scored exactly, or None."""
    for name, module in model.named_modules():
        params = trainable_direct(module)
        if any(type(p).__name__ in ("DTensor", "FlatParameter") or type(p.data).__name__ == "DTensor" for p in params.values()):
            return f"{name} has sharded (FSDP) parameters; influence needs whole layers"
        if params and module_kind(module) is None:
            return (f"{name} ({type(module).__name__}) has trainable parameters {sorted(params)} that are not a linear "
                    "layer, a plain embedding or elementwise (1-D) weights; influence scores cannot cover them exactly")  # fmt: skip
    return None


@dataclass
class ExampleScores:
    """The scores of one micro-batch, one entry per example present in it."""

    example_ids: torch.Tensor  # (K,) int64: row index, or the packed example id
    scores: torch.Tensor  # (K,) float64: < grad l_i, W_val >; 0 for an example with no trained token
    trained_tokens: torch.Tensor  # (K,) int64


def shifted_labels(inputs: dict) -> torch.Tensor:
    """(B, T) targets as the loss uses them: position t predicts labels[t + 1]."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    return torch.nn.functional.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]


def reference_gradient(model, batches: list[dict], params: list[torch.Tensor], chunk_size: int | None = None) -> list[torch.Tensor]:
    """Gradient of L_val (mean loss over every trained token of `batches`) wrt `params`.

    torch.autograd.grad on the unwrapped model: .grad and DDP's gradient hooks stay untouched. In eval
    mode: L_val is the evaluation loss (no dropout), and dropout would draw random numbers that the
    training step then no longer draws, changing training.
    """
    total = sum(int((shifted_labels(batch) != IGNORE_INDEX).sum()) for batch in batches)
    if total == 0:
        raise ValueError("influence: the reference set has no trained tokens")
    was_training = model.training
    model.eval()
    grads = None
    try:
        for batch in batches:
            loss, _ = compute_causal_lm_loss(model, batch, num_items_in_batch=total, chunk_size=chunk_size)
            found = torch.autograd.grad(loss, params, allow_unused=True)
            if grads is None:  # the first batch's gradients become the sums: no extra copy
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]
            else:
                for acc, g in zip(grads, found):
                    if g is not None:
                        acc.add_(g)
    finally:
        model.train(was_training)
    return grads


def adam_precondition(grads: list[torch.Tensor], params: list[torch.Tensor], optimizer) -> None:
    """Divide each gradient in place by AdamW's denominator sqrt(v / (1 - beta2^t)) + eps.

    Parameters without a second moment yet (the first step) stay as they are. The bias correction is
    the one torch's Adam/AdamW apply, so the direction is the one the update really uses.
    """
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the torch one
        optimizer = optimizer.optimizer
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    for param, grad in zip(params, grads):
        state = optimizer.state.get(param, {})
        if "exp_avg_sq" not in state or param not in group_of:
            continue
        beta2, eps = group_of[param]["betas"][1], group_of[param]["eps"]
        correction = 1 - beta2 ** float(state["step"])
        grad.div_((state["exp_avg_sq"] / correction).sqrt_().add_(eps).to(grad.dtype))


class _MicroBatch:
    """Token scores of one micro-batch while its forward and backward run."""

    def __init__(self, shape: tuple[int, int], device, head_direction: torch.Tensor | None):
        self.scaled = torch.zeros(shape, dtype=torch.float64, device=device)  # (B, T), from the layers' taps
        self.head = torch.zeros(shape[0] * shape[1], dtype=torch.float64, device=device)  # (B*T,), unscaled
        self.head_direction = head_direction  # W_val of the output head, None when it is frozen
        self.scale = None  # d(what is backpropagated) / d(loss sum)
        self.rows = None  # (N,) flat positions of the counted tokens

    # The protocol of compute_causal_lm_loss's head_hook: bind, then chunk per chunk, then watch.
    def bind(self, rows: torch.Tensor):
        self.rows = rows
        return None if self.head_direction is None else self.chunk

    def chunk(self, start: int, hidden: torch.Tensor, grad_logits: torch.Tensor) -> None:
        # Head term of a token: d(loss_t)/dE = grad_logits_t (outer) h_t, dotted with E_val. (c, V) @ (V, H).
        # Cast once per micro-batch (a no-op for fp32 weights): a (V, H) copy per chunk would cost as much as the matmul.
        if self.head_direction.dtype != grad_logits.dtype:
            self.head_direction = self.head_direction.to(grad_logits.dtype)
        direction = self.head_direction
        scores = (grad_logits @ direction).mul_(hidden.to(grad_logits.dtype)).sum(-1)  # (c,)
        self.head.index_add_(0, self.rows[start : start + hidden.shape[0]], scores.to(torch.float64))

    def watch(self, loss_sum: torch.Tensor) -> None:
        if loss_sum.requires_grad:
            loss_sum.register_hook(self._record_scale)

    def _record_scale(self, grad: torch.Tensor) -> None:
        self.scale = grad.detach().to(torch.float64)

    def per_example(self, example_ids: torch.Tensor, trained: torch.Tensor) -> ExampleScores:
        if self.scale is None:
            raise RuntimeError("influence: no backward reached the loss inside scoring(); compute the loss with "
                               "compute_causal_lm_loss(..., head_hook=scorer.head_hook) and call backward inside it")  # fmt: skip
        # The layers saw gradients of (scale x loss sum); the head's were computed unscaled.
        tokens = self.scaled / self.scale + self.head.view_as(self.scaled)  # (B, T)
        present = example_ids >= 0
        ids, inverse = torch.unique(example_ids[present], return_inverse=True)
        sums = torch.zeros(ids.shape, dtype=torch.float64, device=tokens.device).index_add_(0, inverse, tokens[present])
        counts = torch.zeros(ids.shape, dtype=torch.long, device=tokens.device).index_add_(0, inverse, trained[present].long())
        scores = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        return ExampleScores(ids.cpu(), scores.cpu(), counts.cpu())


def _example_grid(inputs: dict, shape: tuple[int, int], example_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T) example id of every position: the row index, or the given packed ids (-1: no example)."""
    if example_ids is None:
        return torch.arange(shape[0]).unsqueeze(1).expand(shape)
    if tuple(example_ids.shape) != shape:
        raise ValueError(f"influence: example_ids has shape {tuple(example_ids.shape)}, the labels {shape}")
    # Packed rows are exact only if no example attends to another: transformers separates them from
    # position_ids restarting at 0, and only when no 2-D attention_mask is given.
    both = (example_ids[:, 1:] != example_ids[:, :-1]) & (example_ids[:, 1:] >= 0) & (example_ids[:, :-1] >= 0)
    mask = inputs.get("attention_mask")
    if bool(both.any()) and (inputs.get("position_ids") is None or (mask is not None and mask.dim() == 2)):
        raise ValueError("influence: packed rows need position_ids restarting at 0 per example and no 2-D "
                         "attention_mask, else examples attend to each other and per-example scores are not exact")  # fmt: skip
    return example_ids


class InfluenceScorer:
    """Scores every example of the micro-batches trained inside `scoring()` against a reference set."""

    def __init__(self, model, reference_batches: list[dict], preconditioner: str = "none", chunk_size: int | None = None):
        from accelerate.utils import extract_model_from_parallel

        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"influence preconditioner {preconditioner!r}: choose one of {', '.join(PRECONDITIONERS)}")
        self.model = extract_model_from_parallel(model)
        problem = model_problem(self.model)
        if problem:
            raise ValueError(f"influence: {problem}")
        self.reference_batches = reference_batches
        self.preconditioner = preconditioner
        self.chunk_size = chunk_size
        # Deduplicated: the tied embedding / output head is one parameter, with one gradient.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.taps = ModuleTaps(self.model)
        self.step = None  # the optimizer step W_val belongs to
        self.head_hook: _MicroBatch | None = None  # pass to compute_causal_lm_loss(head_hook=...); None outside scoring()
        self.result: ExampleScores | None = None

    def refresh(self, step, optimizer=None) -> None:
        """Compute W_val at the current weights unless already done for `step`.

        Call before the forward of every scored micro-batch, with the optimizer step it belongs to:
        the first micro-batch of a step computes it, the others of the same step reuse it.
        """
        if step == self.step:
            return
        self.taps.directions = {}  # free the previous step's W_val before the next one exists
        grads = reference_gradient(self.model, self.reference_batches, self.params, self.chunk_size)
        if self.preconditioner == "adam" and optimizer is not None:
            adam_precondition(grads, self.params, optimizer)
        self.taps.directions = dict(zip(self.params, grads))
        self.step = step

    @contextmanager
    def scoring(self, inputs: dict, example_ids: torch.Tensor | None = None):
        """Score the micro-batch `inputs` whose forward and backward run inside this context.

        example_ids: (B, T) int, the example of each position of packed rows (-1 for none); None when
        each row is one example. Afterwards `result` holds the ExampleScores of the micro-batch.
        """
        if self.step is None:
            raise RuntimeError("influence: call refresh(step, optimizer) before scoring()")
        trained = shifted_labels(inputs) != IGNORE_INDEX  # (B, T)
        ids = _example_grid(inputs, tuple(trained.shape), example_ids)
        head = self.model.get_output_embeddings().weight
        batch = _MicroBatch(tuple(trained.shape), head.device, self.taps.directions.get(head))
        self.taps.tokens, self.head_hook, self.result = batch.scaled, batch, None
        try:
            yield self
        finally:
            self.taps.tokens, self.head_hook = None, None
        self.result = batch.per_example(ids.to(head.device), trained.to(head.device))

    def close(self) -> None:
        """Remove the hooks and free W_val."""
        self.taps.close()
        self.taps.directions = {}
        self.step = None
