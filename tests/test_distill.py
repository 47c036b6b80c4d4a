"""The chunked distillation loss must equal the full-logit one built from torch's own cross_entropy
and kl_div (value and gradients), and with alpha = 0 must be plain training, bitwise."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from tiny import build_model, build_tokenizer, masked_batch
from torch.utils._python_dispatch import TorchDispatchMode

from tuner.distill import (
    DISTILL_BUFFERS,
    chunked_distillation_sum,
    compute_distillation_loss,
    option_problems,
    prepare_teacher,
    teacher_hidden_states,
    tokenizer_problem,
    vocab_problem,
)
from tuner.estimate import teacher_memory
from tuner.loss import chunked_cross_entropy_sum, compute_causal_lm_loss

VOCAB, BATCH, SEQ = 96, 2, 11  # 22 positions, 15 trained: a chunk of 4 leaves a remainder


# ---------------------------------------------------------------- reference: full logits, torch's losses


def reference_sum(hidden, weight, targets, teacher_hidden, teacher_weight, alpha, temperature, direction, softcap, teacher_softcap):
    """(1 - alpha) * CE + alpha * T^2 * KL, summed over rows, from the whole (N, V) logits."""
    student = capped(hidden @ weight.T, softcap)
    teacher = capped(teacher_hidden @ teacher_weight.T, teacher_softcap)
    ce = F.cross_entropy(student, targets, reduction="sum")
    log_q, log_p = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    # kl_div(input, target) = sum target * (log target - input): KL(target || input's distribution).
    if direction == "forward":
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    else:
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


def capped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def random_problem(dtype, n=15, hidden=8, teacher_hidden=12, vocab=VOCAB, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, dtype=dtype, generator=generator)  # noqa: E731
    # Logits of size ~3-4, so a softcap of 3 really bends them.
    return {
        "hidden": make(n, hidden).requires_grad_(),
        "weight": make(vocab, hidden).requires_grad_(),
        "targets": torch.randint(0, vocab, (n,), generator=generator),
        "teacher_hidden": make(n, teacher_hidden),
        "teacher_weight": make(vocab, teacher_hidden),
    }


def tolerances(dtype):
    # float64 is the exactness check. In float32 the chunked and the full-logit sums round in different orders:
    # gradient entries of size ~1 differ by up to ~1e-6 (seen 1.14e-6 on an Intel Xeon), a real error by ~1e-2.
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("alpha, temperature", [(0.5, 2.0), (1.0, 1.0), (0.3, 0.7)])
def test_chunked_sums_and_gradients_equal_the_full_logit_ones(dtype, direction, softcap, alpha, temperature):
    problem = random_problem(dtype)
    inputs = (problem["hidden"], problem["weight"])
    options = {"alpha": alpha, "temperature": temperature, "direction": direction}
    teacher_softcap = None if softcap is None else 2.5  # the two models may cap differently
    total, ce, kl = chunked_distillation_sum(*inputs, problem["targets"], problem["teacher_hidden"], problem["teacher_weight"],
                                             softcap=softcap, teacher_softcap=teacher_softcap, chunk_size=4, **options)  # fmt: skip
    grads = torch.autograd.grad(total, inputs)
    expected = reference_sum(*inputs, problem["targets"], problem["teacher_hidden"], problem["teacher_weight"],
                             alpha, temperature, direction, softcap, teacher_softcap)  # fmt: skip
    expected_grads = torch.autograd.grad(expected[0], inputs)
    for ours, reference in zip((total, ce, kl), expected):
        torch.testing.assert_close(ours, reference.detach(), **tolerances(dtype))
    assert kl > 0
    for ours, reference in zip(grads, expected_grads):
        torch.testing.assert_close(ours, reference, **tolerances(dtype))


def test_chunking_never_holds_the_whole_logits():
    """No tensor made during the loss and its backward has as many elements as (N x V) logits."""
    problem = random_problem(torch.float32, n=40, hidden=8, teacher_hidden=12)
    seen = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t))
            return out

    with Sizes():
        total, _, _ = chunked_distillation_sum(**problem, alpha=0.5, temperature=2.0, softcap=3.0, teacher_softcap=3.0, chunk_size=4)
        total.backward()
    assert max(seen) < 40 * VOCAB / 3  # the largest are the (V, Ht) head and the (V, H) gradient
    assert 4 * VOCAB in seen  # the chunks were really computed


@pytest.mark.parametrize("softcap, expected", [(None, 4), (3.0, 5)])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_at_most_distill_buffers_chunk_sized_tensors_are_alive_at_once(softcap, expected, direction):
    """The count DISTILL_BUFFERS (and so teacher_memory and the default chunk size) rests on."""
    problem, chunk = random_problem(torch.float32, n=12), 4
    alive, peak = {}, [0]  # id of a live (chunk x V) tensor -> its data pointer; views share one

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.numel() == chunk * VOCAB and id(t) not in alive:
                    alive[id(t)] = t.data_ptr()
                    weakref.finalize(t, alive.pop, id(t), None)
            peak[0] = max(peak[0], len(set(alive.values())))
            return out

    with Live():
        chunked_distillation_sum(**problem, alpha=0.5, temperature=2.0, direction=direction, softcap=softcap, teacher_softcap=softcap,
                                 chunk_size=chunk)  # fmt: skip
    assert peak[0] == expected <= DISTILL_BUFFERS


def test_backward_scales_by_the_upstream_gradient():
    problem = random_problem(torch.float64, seed=3)
    inputs = (problem["hidden"], problem["weight"])
    options = {"alpha": 0.4, "temperature": 1.5, "direction": "reverse"}
    total, _, _ = chunked_distillation_sum(*inputs, problem["targets"], problem["teacher_hidden"], problem["teacher_weight"],
                                           softcap=3.0, teacher_softcap=3.0, chunk_size=5, **options)  # fmt: skip
    ours = torch.autograd.grad(0.3 * total, inputs)
    expected = reference_sum(*inputs, problem["targets"], problem["teacher_hidden"], problem["teacher_weight"],
                             0.4, 1.5, "reverse", 3.0, 3.0)[0]  # fmt: skip
    for mine, reference in zip(ours, torch.autograd.grad(0.3 * expected, inputs)):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_alpha_zero_is_the_plain_chunked_cross_entropy_bitwise(dtype, softcap):
    """Through the whole distillation path (teacher included), not only compute_distillation_loss's shortcut."""
    problem = random_problem(dtype, seed=1)
    inputs = (problem["hidden"], problem["weight"])
    total, ce, _ = chunked_distillation_sum(**problem, alpha=0.0, temperature=2.0, softcap=softcap, teacher_softcap=softcap, chunk_size=4)
    plain = chunked_cross_entropy_sum(*inputs, problem["targets"], softcap, chunk_size=4)
    assert torch.equal(total, plain) and torch.equal(ce, plain)
    for ours, reference in zip(torch.autograd.grad(total, inputs), torch.autograd.grad(plain, inputs)):
        assert torch.equal(ours, reference)


def test_no_grad_gives_the_same_sums():
    problem = random_problem(torch.float64, seed=2)
    options = {"alpha": 0.5, "temperature": 2.0, "softcap": 3.0, "teacher_softcap": 3.0, "chunk_size": 4}
    with_graph = chunked_distillation_sum(**problem, **options)
    with torch.no_grad():
        without = chunked_distillation_sum(**problem, **options)
    for a, b in zip(with_graph, without):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=0)


def test_a_frozen_head_gets_no_weight_gradient():
    problem = random_problem(torch.float64, seed=4)
    problem["weight"].requires_grad_(False)
    total, _, _ = chunked_distillation_sum(**problem, alpha=0.5, temperature=2.0, chunk_size=4)
    (grad,) = torch.autograd.grad(total, problem["hidden"])
    expected = reference_sum(problem["hidden"], problem["weight"], problem["targets"], problem["teacher_hidden"],
                             problem["teacher_weight"], 0.5, 2.0, "forward", None, None)[0]  # fmt: skip
    torch.testing.assert_close(grad, torch.autograd.grad(expected, problem["hidden"])[0], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- on tiny Gemma 3 models


def tiny_teacher(dtype):
    """A tiny Gemma 3 of another width and depth than the student, sharing its vocabulary."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(7)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=24, max_position_embeddings=1024, sliding_window=64, pad_token_id=0,
                              eos_token_id=1, bos_token_id=2)  # fmt: skip
    return widened(Gemma3ForCausalLM(config).to(dtype))


def widened(model):
    # The default init gives logits near 0, where softcapping is the identity; larger tied embeddings
    # push them into tanh's curved range (as in test_loss.py).
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def models(request):
    return widened(build_model(VOCAB).to(request.param)), prepare_teacher(tiny_teacher(request.param)), request.param


@pytest.fixture
def batch():
    return masked_batch(VOCAB, BATCH, SEQ)


def full_logit_loss(student, teacher, batch, alpha, temperature, direction, num_items=None):
    """The models' own forwards (whole logits, softcap applied by transformers), then torch's losses."""
    logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = batch["labels"][:, 1:].reshape(-1)
    keep = targets != -100
    student_rows, teacher_rows = (x[:, :-1].reshape(-1, VOCAB)[keep] for x in (logits, teacher_logits))
    total = reference_sum(student_rows, torch.eye(VOCAB, dtype=logits.dtype), targets[keep], teacher_rows,
                          torch.eye(VOCAB, dtype=logits.dtype), alpha, temperature, direction, None, None)[0]  # fmt: skip
    return total / (keep.sum() if num_items is None else num_items)


def losses_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("num_items", [None, torch.tensor(37)])
def test_loss_and_gradients_equal_the_full_logit_loss_of_the_models(models, batch, direction, softcap, num_items):
    student, teacher, _ = models
    student.config.final_logit_softcapping = teacher.config.final_logit_softcapping = softcap
    options = {"alpha": 0.6, "temperature": 2.0, "direction": direction}
    try:
        expected, expected_grads = losses_and_grads(student, lambda: full_logit_loss(student, teacher, batch, num_items=num_items, **options))
        ours, grads = losses_and_grads(
            student, lambda: compute_distillation_loss(student, teacher, batch, num_items, chunk_size=4, **options)[0]
        )
    finally:
        student.config.final_logit_softcapping = teacher.config.final_logit_softcapping = None
    scale = lambda t: {"rtol": 1e-5, "atol": 1e-6 * float(t.abs().max())}  # noqa: E731  (float32: see test_loss.py)
    torch.testing.assert_close(ours, expected, **scale(expected))
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **scale(expected_grads[name]), msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_alpha_zero_reproduces_plain_training_bitwise(models, batch):
    student, teacher, _ = models
    plain, plain_grads = losses_and_grads(student, lambda: compute_causal_lm_loss(student, batch, torch.tensor(20))[0])
    ours, grads = losses_and_grads(
        student, lambda: compute_distillation_loss(student, teacher, batch, torch.tensor(20), alpha=0.0, temperature=2.0)[0]
    )
    assert torch.equal(ours, plain)
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name


def test_parts_are_the_normalised_terms(models, batch):
    student, teacher, _ = models
    loss, outputs, parts = compute_distillation_loss(student, teacher, batch, alpha=0.25, temperature=2.0, chunk_size=4)
    torch.testing.assert_close(loss.detach(), 0.75 * parts["ce"] + 0.25 * 4.0 * parts["kl"])
    plain, _ = compute_causal_lm_loss(student, batch)
    torch.testing.assert_close(parts["ce"], plain.detach())
    assert outputs.logits.shape == (BATCH, 0, VOCAB)  # no logits were made
    assert not parts["ce"].requires_grad and not parts["kl"].requires_grad


def test_teacher_hidden_states_need_eval_mode_and_make_no_graph(models, batch):
    _, teacher, _ = models
    hidden = teacher_hidden_states(teacher, batch)
    assert hidden.shape == (BATCH, SEQ, 48) and not hidden.requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    try:
        with pytest.raises(RuntimeError, match="prepare_teacher"):
            teacher_hidden_states(teacher, batch)
    finally:
        teacher.eval()


# ---------------------------------------------------------------- checks before weights load


def test_option_problems_name_each_flag():
    assert option_problems(0.5, 2.0, "forward") == []
    problems = option_problems(1.5, 0.0, "sideways")
    assert [p.split()[0] for p in problems] == ["--distill_alpha", "--distill_temperature", "--distill_direction"]
    assert "1.5" in problems[0] and "sideways" in problems[2]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_the_same_tokenizer_passes(tokenizer):
    assert tokenizer_problem(tokenizer, build_tokenizer(), "teacher") is None


def test_another_vocabulary_is_refused(tokenizer):
    from tiny import SPECIALS, training_text
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(training_text(), trainer=trainer)
    other = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    problem = tokenizer_problem(tokenizer, other, "org/other")
    assert problem.startswith("--teacher_model_name_or_path org/other: ") and "400 tokens against 512" in problem


def test_other_special_tokens_are_refused(tokenizer):
    other = build_tokenizer()
    other.eos_token = "<pad>"
    assert "eos_token is '<pad>', the student's is '<eos>'" in tokenizer_problem(tokenizer, other, "t")


def test_the_same_vocabulary_split_differently_is_refused(tokenizer):
    from tokenizers import pre_tokenizers

    other = build_tokenizer()
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert other.get_vocab() == tokenizer.get_vocab()
    assert "splits text differently" in tokenizer_problem(tokenizer, other, "t")


def test_vocab_problem_compares_the_heads():
    from transformers import Gemma3TextConfig

    assert vocab_problem(Gemma3TextConfig(vocab_size=96), Gemma3TextConfig(vocab_size=96), "t") is None
    assert "128 rows, the student's 96" in vocab_problem(Gemma3TextConfig(vocab_size=96), Gemma3TextConfig(vocab_size=128), "t")


def test_teacher_memory_counts_the_real_weights():
    teacher = tiny_teacher(torch.float32)
    memory = teacher_memory(teacher.config, weight_bytes=4, batch_size=2, seq_len=16)
    assert memory["weights"] == sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert memory["chunk_tokens"] == 32  # the whole micro-batch: fewer tokens than a default chunk
    assert memory["chunk_buffers"] == 5 * 32 * VOCAB * 4
    assert memory["hidden"] == 2 * 32 * 48 * 4


@pytest.mark.slow
def test_gemma_tokenizer_teaches_gemma_and_refuses_another():
    from transformers import AutoTokenizer

    from tuner.offline import ensure_checkpoint

    path = str(ensure_checkpoint())
    gemma = AutoTokenizer.from_pretrained(path)
    assert tokenizer_problem(gemma, AutoTokenizer.from_pretrained(path), "offline:gemma-3-270m") is None
    assert "512 tokens against 262,144" in tokenizer_problem(gemma, build_tokenizer(), "tiny")
