"""Distillation from a frozen teacher, in the same chunked pass as the lean cross-entropy (loss.py).

The loss on the trained tokens (labels != -100 after the causal shift, as in loss.py) is

    (1 - alpha) * CE(student) + alpha * T^2 * KL

with p = softmax(teacher_logits / T) and q = softmax(student_logits / T) over the vocabulary, and
KL = KL(p || q) ("forward", the default: the student covers all the teacher's mass, as in Hinton et
al. 2015 and torchtune's KD recipe) or KL(q || p) ("reverse": mode-seeking, as in MiniLLM and TRL's
GKD with beta = 1). The CE is at temperature 1, against the data's next token. T^2 keeps the KL's
gradient on the scale of the CE's as T grows (Hinton et al.). Both models' logits are softcapped
first when their config sets `final_logit_softcapping` (Gemma), exactly as their forward would.

Normalisation: the CE and the KL are both *summed* over the trained tokens and the combined sum is
divided by `num_items_in_batch` when the Trainer passes it, else by the number of trained tokens: the
KL is a per-token mean, like the CE, and gradient accumulation stays exact.

Memory. Gemma's vocabulary has 262,144 entries, so neither model's (tokens x vocab) logits may exist
at once. The student's and the teacher's final hidden states come from forwards that produce no
logits (`logits_to_keep` of zero positions); then both heads, the CE, the KL and their gradients
wrt the student's hidden states and head weight run chunk by chunk over the tokens, in the
forward (the reason is loss.py's: recomputing in backward would cost another vocab-sized matmul).
At most DISTILL_BUFFERS = 5 fp32 (chunk x vocab) buffers exist at a time (4 without a softcap; a
test counts them), against 2 for the plain loss, so the default chunk is half of loss.py's: 128
tokens for Gemma, 640 MiB of buffers (the plain loss: 512 MiB; estimate.py budgets it 768).

alpha = 0 is plain training: `compute_distillation_loss` then calls loss.py's loss and never runs the
teacher, so loss and gradients are bitwise those of training without a teacher.
"""

from __future__ import annotations

import math

import torch

from tuner.common import IGNORE_INDEX, text_config
from tuner.loss import _chunk_loss, _ChunkedLinearCrossEntropy, _output_head, compute_causal_lm_loss
from tuner.loss import default_chunk_size as loss_chunk_size

FORWARD, REVERSE = "forward", "reverse"
DIRECTIONS = (FORWARD, REVERSE)
# fp32 (chunk x vocab) buffers alive at the peak of one chunk: tanh of the student's logits (kept for
# the softcap's derivative), the CE gradient, the teacher's and the student's log-probabilities and
# one of the two distributions; see _sums_and_grads and _kl_chunk.
DISTILL_BUFFERS = 5
# Flag names as users type them, for messages; the options themselves live in config.py.
ALPHA_FLAG, TEMPERATURE_FLAG, DIRECTION_FLAG = "--distill_alpha", "--distill_temperature", "--distill_direction"
TEACHER_FLAG = "--teacher_model_name_or_path"
# Text whose encoding must agree between the two tokenizers: ASCII, digits, spacing, accents, CJK,
# emoji and markup, so a differing normaliser or pre-tokenizer shows even when the vocabularies match.
PROBE_TEXT = "Hello, World!  12,345.6\n\tnaïve café — 東京 🙂 <b>x</b> def f(x): return x**2"


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: half of loss.py's, since a chunk holds up to 5 (chunk x vocab) buffers, not 2."""
    return max(1, loss_chunk_size(vocab_size) // 2)


# ---------------------------------------------------------------- checks before weights load


def option_problems(alpha: float, temperature: float, direction: str) -> list[str]:
    """Every problem with the distillation options, each naming the flag, the value and the fix."""
    problems = []
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"{ALPHA_FLAG} {alpha}: must be between 0 and 1 (the weight of the KL term; 0 trains on the data only).")
    if not (math.isfinite(temperature) and temperature > 0):
        problems.append(
            f"{TEMPERATURE_FLAG} {temperature}: must be a positive number (1 leaves the distributions as they are; 2 is common)."
        )
    if direction not in DIRECTIONS:
        problems.append(f"{DIRECTION_FLAG} {direction}: must be one of {', '.join(DIRECTIONS)} (forward is KL(teacher || student)).")
    return problems


def tokenizer_problem(student_tokenizer, teacher_tokenizer, teacher_name: str) -> str | None:
    """Why the teacher's tokenizer cannot teach the student, or None when the two agree.

    The KL compares the two models' probabilities of token id v for every v, so ids must mean the
    same strings: the vocabularies (with added tokens), BOS/EOS/UNK and the encoding of a probe text
    must agree. The pad token is not compared: padded positions are never trained and both models
    read the same ids, and loading sets a missing pad token to EOS (models.load_tokenizer).
    """
    flag = f"{TEACHER_FLAG} {teacher_name}"
    fix = "Choose a teacher that uses the student's tokenizer (the same model family, e.g. a larger Gemma 3 for Gemma 3 270M)."
    why = "distillation compares the two models' probabilities token id by token id, so they must share one tokenizer"
    difference = _vocabulary_difference(student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    if difference:
        return f"{flag}: its tokenizer's vocabulary differs from the student's ({difference}); {why}. {fix}"
    for special in ("bos_token", "eos_token", "unk_token"):
        ours, theirs = getattr(student_tokenizer, special), getattr(teacher_tokenizer, special)
        if ours != theirs:
            return f"{flag}: its {special} is {theirs!r}, the student's is {ours!r}; {why}. {fix}"
    ours, theirs = student_tokenizer(PROBE_TEXT)["input_ids"], teacher_tokenizer(PROBE_TEXT)["input_ids"]
    if ours != theirs:
        difference = f"{PROBE_TEXT!r} gives {theirs} against {ours}"
        return f"{flag}: its tokenizer splits text differently from the student's ({difference}); {why}. {fix}"
    return None


def _vocabulary_difference(student: dict[str, int], teacher: dict[str, int]) -> str | None:
    if student == teacher:
        return None
    if len(student) != len(teacher):
        return f"{len(teacher):,} tokens against {len(student):,}"
    differing = [token for token, index in student.items() if teacher.get(token) != index]
    examples = ", ".join(f"{token!r} is {student[token]} for the student, {teacher.get(token)} for the teacher" for token in differing[:3])
    return f"{len(differing):,} tokens differ: {examples}"


def vocab_problem(student_config, teacher_config, teacher_name: str) -> str | None:
    """Why the two heads cannot be compared row by row (e.g. one embedding padded to a multiple of 64)."""
    ours, theirs = text_config(student_config).vocab_size, text_config(teacher_config).vocab_size
    if ours == theirs:
        return None
    return (
        f"{TEACHER_FLAG} {teacher_name}: its output layer has {theirs:,} rows, the student's {ours:,}; the KL needs one "
        "probability per token id in both. Choose a teacher with the student's vocabulary size."
    )




# ---------------------------------------------------------------- forwards without logits


def prepare_teacher(teacher):
    """Frozen and in eval mode (no dropout): the teacher is a fixed function of the input."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def final_hidden_states(model, inputs: dict):
    """(hidden (B, T, H) after the final norm, outputs) from a forward that computes no logits."""
    head, _ = _output_head(model)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    no_positions = torch.empty(0, dtype=torch.long, device=head.weight.device)
    outputs = model(**model_inputs, logits_to_keep=no_positions, output_hidden_states=True, use_cache=False)
    # transformers replaces hidden_states[-1] by last_hidden_state: what lm_head would have received.
    return outputs.hidden_states[-1], outputs


def teacher_hidden_states(teacher, inputs: dict) -> torch.Tensor:
    """The teacher's final hidden states (B, T, Ht), no logits, no graph; the rest of its outputs is dropped."""
    if teacher.training:
        raise RuntimeError("the teacher is in training mode: call tuner.distill.prepare_teacher(teacher) once after loading it")
    device = _output_head(teacher)[0].weight.device
    with torch.no_grad():
        hidden, _ = final_hidden_states(teacher, {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
    return hidden


def trained_rows(inputs: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (N,), targets (N,)): the flattened (B*T) positions that are trained and their next tokens."""
    labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
    if labels is None and shift_labels is None:
        raise ValueError("distillation needs inputs['labels'] (or already shifted inputs['shift_labels'])")
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    targets = shift_labels.reshape(-1).to(device)  # (B*T,)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows)


# ---------------------------------------------------------------- the loss


def compute_distillation_loss(model, teacher, inputs: dict, num_items_in_batch=None, *, alpha: float, temperature: float = 1.0,
                              direction: str = FORWARD, chunk_size: int | None = None):  # fmt: skip
    """(loss, outputs, parts) of a (possibly DDP-wrapped) student taught by `teacher`.

    `outputs` are the student's, with no logits; `parts` = {"ce", "kl"}: the two terms, detached and
    normalised like the loss, before weighting (kl is None when alpha is 0 and the teacher is not
    run). The teacher must have gone through prepare_teacher and sit on the student's device.
    """
    if alpha == 0:  # plain training, bitwise: loss.py's own loss, and no teacher forward to pay for
        loss, outputs = compute_causal_lm_loss(model, inputs, num_items_in_batch, chunk_size=chunk_size)
        return loss, outputs, {"ce": loss.detach(), "kl": None}
    # The teacher first: its forward's transient memory is then freed before the student's
    # activations build up, instead of stacking on them.
    teacher_hidden = teacher_hidden_states(teacher, inputs)  # (B, T, Ht)
    teacher_head, teacher_softcap = _output_head(teacher)
    head, softcap = _output_head(model)
    hidden, outputs = final_hidden_states(model, inputs)  # (B, T, H)
    rows, targets = trained_rows(inputs, hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (N, H)
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows.to(teacher_hidden.device))  # (N, Ht)
    total, ce, kl = chunked_distillation_sum(
        hidden, head.weight, targets, teacher_hidden, teacher_head.weight, alpha=alpha, temperature=temperature,
        direction=direction, softcap=softcap, teacher_softcap=teacher_softcap, chunk_size=chunk_size,
    )  # fmt: skip
    count = rows.numel() if num_items_in_batch is None else num_items_in_batch  # nan when nothing is counted, as loss.py
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count, outputs, {"ce": ce / count, "kl": kl / count}


def chunked_distillation_sum(hidden, weight, targets, teacher_hidden, teacher_weight, *, alpha: float, temperature: float = 1.0,
                             direction: str = FORWARD, softcap=None, teacher_softcap=None, chunk_size=None):  # fmt: skip
    """(total, ce, kl) summed over the N rows: total = (1 - alpha) * ce + alpha * T^2 * kl.

    hidden (N, H) and weight (V, H) are the student's final hidden states and head; teacher_hidden
    (N, Ht) and teacher_weight (V, Ht) the teacher's; targets (N,) the next tokens of the trained
    rows only. `total` is differentiable in hidden and weight; ce and kl are detached.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"the teacher's head has {teacher_weight.shape[0]} rows, the student's {weight.shape[0]}")
    teacher = (teacher_hidden.detach(), teacher_weight.detach(), teacher_softcap)
    options = (alpha, temperature, direction, softcap, chunk_size or default_chunk_size(weight.shape[0]))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedDistillation.apply(hidden, weight, targets, teacher, options)
    total, ce, kl, _, _ = _sums_and_grads(hidden, weight, targets, teacher, options, need=(False, False))
    return total, ce, kl


class _ChunkedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher, options):
        need = ctx.needs_input_grad[:2]  # a frozen head (LoRA) skips the (V, H) weight gradient
        total, ce, kl, grad_hidden, grad_weight = _sums_and_grads(hidden, weight, targets, teacher, options, need)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.backward_done = False
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        # loss.py's backward: scale the stored gradients in place, once; its trailing Nones are for
        # (targets, softcap, chunk_size), ours for (targets, teacher, options).
        grad_hidden, grad_weight, *_ = _ChunkedLinearCrossEntropy.backward(ctx, grad_total)
        return grad_hidden, grad_weight, None, None, None


def _sums_and_grads(hidden, weight, targets, teacher, options, need: tuple[bool, bool]):
    """(total, ce, kl) sums and d(total)/d(hidden) (N, H), d(total)/d(weight) (V, H) as `need` asks."""
    teacher_hidden, teacher_weight, teacher_softcap = teacher
    alpha, temperature, direction, softcap, chunk_size = options
    with_grads = any(need)
    acc = torch.promote_types(weight.dtype, torch.float32)
    ce_sum = torch.zeros((), dtype=acc, device=hidden.device)
    kl_sum = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None  # fp32 sum, as loss.py
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, y = hidden[rows], targets[rows]  # (c, H), (c,)
        logits = h @ weight.T  # (c, V)
        log_q, tanh = _student_log_q(logits, softcap, temperature, acc)  # before _chunk_loss overwrites logits
        chunk_ce, grad = _chunk_loss(logits, y, softcap, with_grads)  # grad: d(ce)/d(raw logits) (c, V)
        del logits
        log_p = _teacher_log_p(teacher_hidden[rows], teacher_weight, teacher_softcap, temperature, acc)
        chunk_kl, grad_kl = _kl_chunk(log_q, log_p, temperature, direction, with_grads)  # grad wrt capped logits
        del log_p, log_q  # grad_kl may live on in log_q's buffer
        ce_sum += chunk_ce
        kl_sum += chunk_kl
        if with_grads:
            if tanh is not None:
                grad_kl.mul_(tanh.square_().neg_().add_(1))  # d(cap * tanh(x / cap))/dx = 1 - tanh^2
            # alpha = 0 leaves `grad` bitwise the CE's: x * 1.0 + 0.0 * finite is x.
            grad.mul_(1 - alpha).add_(grad_kl, alpha=alpha * temperature**2)
            if grad_hidden is not None:
                grad_hidden[rows] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h.to(acc))
        del grad, grad_kl, tanh  # else they live on beside the next chunk's buffers
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    total = (1 - alpha) * ce_sum + alpha * temperature**2 * kl_sum
    return total, ce_sum, kl_sum, grad_hidden, grad_weight


def _student_log_q(logits, softcap, temperature: float, acc):
    """(log softmax(capped logits / T) (c, V), tanh(logits / cap) (c, V) or None without a softcap).

    tanh is kept because its square gives the softcap's derivative for the KL's gradient.
    """
    if softcap is None:
        return torch.log_softmax(logits.to(acc, copy=True).div_(temperature), dim=-1), None
    tanh = logits.to(acc, copy=True).div_(softcap).tanh_()
    return torch.log_softmax(tanh * (softcap / temperature), dim=-1), tanh


def _teacher_log_p(teacher_hidden, teacher_weight, softcap, temperature: float, acc):
    """log softmax(capped teacher logits / T) (c, V) of one chunk; the logits are a temporary."""
    logits = (teacher_hidden.to(teacher_weight.device) @ teacher_weight.T).to(acc)  # (c, V)
    if softcap is not None:  # Gemma's final_logit_softcapping, as the teacher's forward applies it
        logits.div_(softcap).tanh_().mul_(softcap)
    return torch.log_softmax(logits.div_(temperature), dim=-1)


def _kl_chunk(log_q, log_p, temperature: float, direction: str, with_grads: bool):
    """Summed KL of one chunk, and its gradient wrt the student's (softcapped) logits s if asked.

    log_q, log_p: (c, V) log-probabilities of the student and the teacher at temperature T, in the
    accumulation dtype; both are overwritten. With q = softmax(s / T), the gradient wrt s is
      forward KL(p || q) = sum p (log p - log q):  (q - p) / T
      reverse KL(q || p) = sum q (log q - log p):  q * (log q - log p - KL_row) / T
    One more (c, V) buffer (p or q) exists while it runs.
    """
    if direction == FORWARD:
        p = log_p.exp()
        difference = log_p.sub_(log_q)  # log p - log q, in log_p's buffer
        kl_rows = torch.einsum("cv,cv->c", p, difference)  # (c,), with no (c, V) product
        grad = log_q.exp_().sub_(p).div_(temperature) if with_grads else None
        return kl_rows.sum(), grad
    q = log_q.exp()
    difference = log_q.sub_(log_p)  # log q - log p, in log_q's buffer
    kl_rows = torch.einsum("cv,cv->c", q, difference)
    grad = difference.sub_(kl_rows[:, None]).mul_(q).div_(temperature) if with_grads else None
    return kl_rows.sum(), grad
