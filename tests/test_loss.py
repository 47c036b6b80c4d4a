"""The chunked loss must equal the model's own loss, and give the same gradients, on a tiny Gemma 3."""

from __future__ import annotations

import pytest
import torch
from tiny import build_model, masked_batch

from tuner.loss import chunked_cross_entropy_sum, compute_causal_lm_loss, liger_problem

VOCAB, BATCH, SEQ = 96, 2, 11  # 22 tokens, so a chunk of 4 leaves a remainder


@pytest.fixture(scope="module")
def model():
    model = build_model(VOCAB).double()
    with torch.no_grad():
        # The default init gives logits near 0, where a softcap is the identity; larger tied
        # embeddings push them into tanh's curved range so softcapping is really exercised.
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


@pytest.fixture
def batch():
    return masked_batch(VOCAB, BATCH, SEQ)


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(model, batch, num_items=None, chunk_size=None):
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    expected, expected_grads = loss_and_grads(model, lambda: model(**batch, **kwargs).loss)
    ours, grads = loss_and_grads(
        model, lambda: compute_causal_lm_loss(model, batch, num_items, chunk_size=chunk_size)[0]
    )
    assert_close(ours, expected)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name)


def assert_close(actual, expected, name=""):
    # transformers computes its loss in fp32 even for this float64 model (`logits.float()`), so the
    # reference carries fp32 rounding; entries far below the tensor's scale are judged against it.
    atol = 1e-6 * float(expected.detach().abs().max())
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=atol, msg=name or None)


@pytest.mark.parametrize("chunk_size", [None, 4])  # 15 counted tokens: 4 leaves a remainder
@pytest.mark.parametrize("num_items", [None, torch.tensor(37)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_loss_and_gradients_equal_the_models_own(model, batch, chunk_size, num_items, softcap):
    model.config.final_logit_softcapping = softcap
    try:
        assert_same(model, batch, num_items, chunk_size)
    finally:
        model.config.final_logit_softcapping = None


def test_outputs_carry_no_logits(model, batch):
    _, outputs = compute_causal_lm_loss(model, batch)
    assert outputs.logits.shape == (BATCH, 0, VOCAB)


def test_caller_inputs_are_not_modified(model, batch):
    keys = set(batch)
    compute_causal_lm_loss(model, batch)
    assert set(batch) == keys


def test_no_grad_evaluation_matches(model, batch):
    with torch.no_grad():
        expected = model(**batch).loss
        ours, _ = compute_causal_lm_loss(model, batch, chunk_size=5)
    assert_close(ours, expected)


def test_shift_labels_are_used_as_given(model, batch):
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    given = {k: v for k, v in batch.items() if k != "labels"} | {"shift_labels": shifted}
    ours, _ = compute_causal_lm_loss(model, given)
    assert_close(ours, model(**batch).loss)


def test_backward_scales_by_the_upstream_gradient():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 13, (7,), generator=generator)
    ours = torch.autograd.grad(0.3 * chunked_cross_entropy_sum(hidden, weight, targets, 2.0, chunk_size=3), (hidden, weight))
    logits = 2.0 * torch.tanh(hidden @ weight.T / 2.0)
    loss = 0.3 * torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    for mine, reference in zip(ours, torch.autograd.grad(loss, (hidden, weight))):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


def test_a_second_backward_through_the_same_graph_is_refused(model, batch):
    loss, _ = compute_causal_lm_loss(model, batch)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_gradients_sync_through_a_ddp_wrapper(model, batch, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        expected, expected_grads = loss_and_grads(model, lambda: model(**batch).loss)
        # Two steps: DDP raises on the second if a parameter got no gradient in the first.
        for _ in range(2):
            ours, grads = loss_and_grads(model, lambda: compute_causal_lm_loss(wrapped, batch)[0])
        assert_close(ours, expected)
        for name, grad in grads.items():
            assert_close(grad, expected_grads[name], name)
    finally:
        dist.destroy_process_group()


def test_liger_problem_names_the_reason():
    assert "CUDA" in liger_problem(cuda_available=False, installed=True)
    assert "pip install liger-kernel" in liger_problem(cuda_available=True, installed=False)
    assert liger_problem(cuda_available=True, installed=True) is None


@pytest.mark.gpu
def test_liger_matches_the_models_loss(batch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel")
    model = build_model(VOCAB).cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    expected, expected_grads = loss_and_grads(model, lambda: model(**batch).loss)
    ours, grads = loss_and_grads(model, lambda: compute_causal_lm_loss(model, batch, use_liger=True)[0])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_frozen_head_gets_no_gradient_but_the_rest_is_unchanged(model, batch):
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(False)
    try:
        expected, expected_grads = loss_and_grads(model, lambda: model(**batch).loss)
        ours, grads = loss_and_grads(model, lambda: compute_causal_lm_loss(model, batch, chunk_size=4)[0])
    finally:
        embedding.requires_grad_(True)
    assert embedding.grad is None
    assert_close(ours, expected)
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name)



def test_chunk_hook_sees_every_row_once_with_its_logit_gradient():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 13, (7,), generator=generator)
    seen = []
    loss = chunked_cross_entropy_sum(hidden, weight, targets, 2.0, chunk_size=3, chunk_hook=lambda *a: seen.append(a))
    logits = (hidden @ weight.T).detach().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(2.0 * torch.tanh(logits / 2.0), targets, reduction="sum")
    (expected,) = torch.autograd.grad(reference, logits)
    assert [start for start, _, _ in seen] == [0, 3, 6]
    torch.testing.assert_close(torch.cat([h for _, h, _ in seen]), hidden.detach(), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([g for _, _, g in seen]), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_label_smoothing_equals_transformers_label_smoother(model, batch, softcap):
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = LabelSmoother(epsilon=0.1)
    model.config.final_logit_softcapping = softcap
    try:
        def reference():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            return smoother({"logits": logits}, batch["labels"], shift_labels=True)

        expected, expected_grads = loss_and_grads(model, reference)
        ours, grads = loss_and_grads(model, lambda: compute_causal_lm_loss(model, batch, chunk_size=4, label_smoothing=0.1)[0])
    finally:
        model.config.final_logit_softcapping = None
    assert_close(ours, expected)
    plain = compute_causal_lm_loss(model, batch)[0].detach()
    assert not torch.allclose(ours, plain)  # smoothing changed the loss
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name)
