"""Influence scores equal brute force: < grad l_i, grad L_val > from explicit per-example gradients.

The reference side never touches tuner.loss or the hooks: losses come from the model's own logits
(its forward applies Gemma's final softcapping), per-token cross-entropy from torch, and every
gradient from torch.autograd.grad on one example's mean loss at a time, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import build_model

from tuner.influence.scores import InfluenceScorer, config_problem, model_problem
from tuner.loss import compute_causal_lm_loss

VOCAB, PAD = 96, 0
REL_TOL = 1e-6
TRAINABLE = {
    "all": lambda name: True,
    "attention": lambda name: "self_attn" in name and "proj" in name,
    "mlp": lambda name: "mlp" in name,
    "norms": lambda name: "norm" in name,
    "embedding": lambda name: "embed_tokens" in name,  # tied: the input lookup and the output head
}


@pytest.fixture
def float64_norms(monkeypatch):
    """Gemma3RMSNorm in the input's dtype: the model's own forward computes it in float32 even in a
    float64 model (`x.float()`), which leaves ~1e-5 relative float32 noise between any two ways of
    computing the same gradient, brute force included. Same formula, without the casts."""
    from transformers.models.gemma3 import modeling_gemma3

    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", lambda self, x: self._norm(x) * (1.0 + self.weight))


def tiny(dtype=torch.float64, seed=0, softcap=3.0):
    model = build_model(VOCAB, seed=seed).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            # Init leaves norms at (1 + 0) and logits near 0; random values exercise every term and
            # push the logits into the softcap's curved range.
            scale = 1.0 if param.dim() == 2 and param.shape[0] == VOCAB else 0.3 if param.dim() == 1 else None
            if scale is not None:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype) * scale)
    model.config.final_logit_softcapping = softcap
    return model


def rows_batch(seed, batch=3, length=11):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)  # 0 is <pad>: its row gets no gradient
    input_ids[0, 5] = PAD
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.clone()
    labels[1, -3:] = -100
    labels[0, 2:4] = -100  # e.g. a masked prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch(seed):
    """Two rows of packed examples: lengths (4, 5, 2) and (6, 3) then 2 padding positions (id -1)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (2, 11), generator=generator)
    lengths = [[4, 5, 2], [6, 3, 2]]
    position_ids, example_ids = torch.zeros_like(input_ids), torch.full_like(input_ids, -1)
    labels = input_ids.clone()
    next_id = 10
    for row, sizes in enumerate(lengths):
        start = 0
        for i, size in enumerate(sizes):
            position_ids[row, start : start + size] = torch.arange(size)
            labels[row, start] = -100  # as a packing collator does: no prediction across examples
            if not (row == 1 and i == 2):
                example_ids[row, start : start + size] = next_id
                next_id += 3
            start += size
    labels[1, 9:] = -100  # the padding tail
    labels[0, 6] = -100
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}, example_ids


def token_losses(model, batch):
    """(B, T) cross-entropy of each position from the model's own logits, and the trained mask."""
    # use_cache=False: with a cache, transformers ignores packed position_ids and lets examples attend to each other.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits  # (B, T, V)
    targets = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2).double(), targets, reduction="none", ignore_index=-100)
    return losses, targets != -100


def brute_reference_gradient(model, batches, params):
    was_training = model.training
    model.eval()
    try:
        pairs = [token_losses(model, batch) for batch in batches]
        mean = sum(losses[mask].sum() for losses, mask in pairs) / sum(mask.sum() for _, mask in pairs)
        return torch.autograd.grad(mean, params)
    finally:
        model.train(was_training)


def brute_scores(model, batch, params, reference, example_ids=None):
    """{example id: score}, one autograd.grad per example on its own mean loss."""
    was_training = model.training
    model.eval()
    try:
        losses, mask = token_losses(model, batch)
        if example_ids is None:
            example_ids = torch.arange(losses.shape[0]).unsqueeze(1).expand_as(losses)
        scores = {}
        for example in example_ids.unique().tolist():
            own = (example_ids == example) & mask
            if example < 0 or not own.any():
                continue
            grads = torch.autograd.grad(losses[own].mean(), params, retain_graph=True)
            scores[example] = sum(float((g.double() * r.double()).sum()) for g, r in zip(grads, reference))
        return scores
    finally:
        model.train(was_training)


def scored_step(scorer, model, batch, example_ids=None, num_items=None, divide=1.0, chunk_size=4):
    with scorer.scoring(batch, example_ids):
        loss, _ = compute_causal_lm_loss(model, batch, num_items, chunk_size=chunk_size, head_hook=scorer.head_hook)
        (loss / divide).backward()
    result = scorer.result
    return {int(i): float(s) for i, s, n in zip(result.example_ids, result.scores, result.trained_tokens) if n > 0}


def assert_scores_equal(ours, brute):
    assert ours.keys() == brute.keys()
    worst = max(abs(ours[k] - brute[k]) / abs(brute[k]) for k in brute)
    assert worst <= REL_TOL, f"relative error {worst:.2e}; ours {ours}, brute force {brute}"


def trainable(model, which):
    for name, param in model.named_parameters():
        param.requires_grad_(TRAINABLE[which](name))
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("which", list(TRAINABLE))
def test_row_scores_equal_brute_force_for_every_parameter_kind(which, float64_norms):
    model = tiny()
    params = trainable(model, which)
    reference_batches = [rows_batch(10, batch=2, length=9), rows_batch(11, batch=3, length=7)]
    batch = rows_batch(0)
    brute = brute_scores(model, batch, params, brute_reference_gradient(model, reference_batches, params))
    scorer = InfluenceScorer(model, reference_batches)
    scorer.refresh(step=0)
    assert all(p.grad is None for p in params), "the reference gradient must not reach .grad"
    # num_items and the division stand for Trainer's scaling of the loss: scores must not see them.
    assert_scores_equal(scored_step(scorer, model, batch, num_items=torch.tensor(41), divide=4.0), brute)


def test_without_softcapping(float64_norms):
    model = tiny(softcap=None)
    params = trainable(model, "all")
    reference_batches = [rows_batch(10)]
    batch = rows_batch(0)
    brute = brute_scores(model, batch, params, brute_reference_gradient(model, reference_batches, params))
    scorer = InfluenceScorer(model, reference_batches)
    scorer.refresh(step=0)
    assert_scores_equal(scored_step(scorer, model, batch, chunk_size=None), brute)


def test_packed_rows_score_each_packed_example(float64_norms):
    model = tiny()
    params = trainable(model, "all")
    reference_batches = [rows_batch(10)]
    batch, example_ids = packed_batch(0)
    brute = brute_scores(model, batch, params, brute_reference_gradient(model, reference_batches, params), example_ids)
    scorer = InfluenceScorer(model, reference_batches)
    scorer.refresh(step=0)
    ours = scored_step(scorer, model, batch, example_ids)
    assert sorted(ours) == [10, 13, 16, 19, 22]
    assert_scores_equal(ours, brute)
    counts = dict(zip(scorer.result.example_ids.tolist(), scorer.result.trained_tokens.tolist()))
    assert counts == {10: 3, 13: 3, 16: 1, 19: 5, 22: 2}


def test_packed_rows_with_a_2d_attention_mask_are_refused():
    model = tiny()
    scorer = InfluenceScorer(model, [rows_batch(10)])
    scorer.refresh(step=0)
    batch, example_ids = packed_batch(0)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with pytest.raises(ValueError, match="attend to each other"):
        with scorer.scoring(batch, example_ids):
            pass


def test_gradient_accumulation_scores_each_micro_batch_with_the_steps_reference_gradient(float64_norms):
    model = tiny()
    params = trainable(model, "all")
    reference_batches = [rows_batch(10)]
    micro_batches = [rows_batch(0), rows_batch(1, batch=2, length=8)]
    reference = brute_reference_gradient(model, reference_batches, params)
    brute = [brute_scores(model, batch, params, reference) for batch in micro_batches]
    scorer = InfluenceScorer(model, reference_batches)
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)  # Trainer's count over the step
    for batch, expected in zip(micro_batches, brute):
        scorer.refresh(step=7)  # the second call of the same step reuses W_val
        assert_scores_equal(scored_step(scorer, model, batch, num_items=num_items), expected)
    assert all(p.grad is not None for p in params)  # the training gradient accumulated as usual


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant, float64_norms):
    model = tiny()
    params = trainable(model, "all")
    reference_batches = [rows_batch(10)]
    batch = rows_batch(0)
    brute = brute_scores(model, batch, params, brute_reference_gradient(model, reference_batches, params))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    scorer = InfluenceScorer(model, reference_batches)
    scorer.refresh(step=0)
    # Recomputation runs every layer's forward twice: a token scored twice would double its terms.
    assert_scores_equal(scored_step(scorer, model, batch), brute)


def test_lora_scores_cover_the_adapter_only(float64_norms):
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: random B as well as A, else lora_A's gradient is zero at the start.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(tiny(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    reference_batches = [rows_batch(10)]
    batch = rows_batch(0)
    brute = brute_scores(model, batch, params, brute_reference_gradient(model, reference_batches, params))
    scorer = InfluenceScorer(model, reference_batches)
    scorer.refresh(step=0)
    assert_scores_equal(scored_step(scorer, model, batch), brute)


def test_adam_preconditioner_divides_the_reference_gradient_by_adamws_denominator(float64_norms):
    model = tiny()
    params = trainable(model, "all")
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    compute_causal_lm_loss(model, rows_batch(5))[0].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reference_batches = [rows_batch(10)]
    batch = rows_batch(0)
    # AdamW after one step: v = (1 - beta2) g^2, bias-corrected v / (1 - beta2) = g^2, so the
    # denominator is |g_1| + eps, with g_1 the first step's gradient (recovered from exp_avg = 0.1 g_1).
    first = [optimizer.state[p]["exp_avg"] / 0.1 for p in params]
    reference = [r / (g.abs() + 1e-6) for r, g in zip(brute_reference_gradient(model, reference_batches, params), first)]
    brute = brute_scores(model, batch, params, reference)
    scorer = InfluenceScorer(model, reference_batches, preconditioner="adam")
    scorer.refresh(step=1, optimizer=optimizer)
    assert_scores_equal(scored_step(scorer, model, batch), brute)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_is_bitwise_unchanged(checkpointing):
    """Two optimizer steps of two micro-batches each, fp32 AdamW: the same weights with and without scoring."""
    micro_batches = [rows_batch(0), rows_batch(1)]
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    final = []
    for score in (False, True):
        model = tiny(dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scorer = InfluenceScorer(model, [rows_batch(10)], preconditioner="adam") if score else None
        for step in range(2):
            for batch in micro_batches:
                if scorer:
                    scorer.refresh(step, optimizer)
                    scored_step(scorer, model, batch, num_items=num_items, divide=2.0)
                else:
                    (compute_causal_lm_loss(model, batch, num_items, chunk_size=4)[0] / 2.0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        final.append({name: p.detach().clone() for name, p in model.named_parameters()})
    for name, weight in final[0].items():
        assert torch.equal(weight, final[1][name]), name


def test_refresh_computes_once_per_step():
    model = tiny()
    scorer = InfluenceScorer(model, [rows_batch(10)])
    scorer.refresh(step=3)
    first = dict(scorer.taps.directions)
    scorer.refresh(step=3)
    assert all(scorer.taps.directions[p] is first[p] for p in first)
    scorer.refresh(step=4)
    assert all(scorer.taps.directions[p] is not first[p] for p in first)


def test_scoring_before_refresh_and_without_backward_fail_clearly():
    model = tiny()
    scorer = InfluenceScorer(model, [rows_batch(10)])
    with pytest.raises(RuntimeError, match="refresh"):
        with scorer.scoring(rows_batch(0)):
            pass
    scorer.refresh(step=0)
    with pytest.raises(RuntimeError, match="no backward"):
        with scorer.scoring(rows_batch(0)):
            compute_causal_lm_loss(model, rows_batch(0), head_hook=scorer.head_hook)


def test_hooks_do_nothing_outside_scoring_and_close_removes_them():
    model = tiny()
    scorer = InfluenceScorer(model, [rows_batch(10)])
    scorer.refresh(step=0)
    loss, _ = compute_causal_lm_loss(model, rows_batch(0), head_hook=scorer.head_hook)  # head_hook is None here
    assert scorer.head_hook is None and loss.grad_fn is not None
    assert not any("Tap" in name for name in graph_nodes(loss.grad_fn))
    with scorer.scoring(rows_batch(0)):
        scored, _ = compute_causal_lm_loss(model, rows_batch(0), head_hook=scorer.head_hook)
        assert "_TapBackward" in graph_nodes(scored.grad_fn)
        scored.backward()
    ours = lambda: [h for m in model.modules() for h in m._forward_hooks.values() if getattr(h, "__self__", None) is scorer.taps]  # noqa: E731
    assert len(ours()) == len(scorer.taps.kinds)
    scorer.close()
    assert not ours()


def graph_nodes(node, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    if node is not None and node not in seen:
        seen.add(node)
        for parent, _ in node.next_functions:
            graph_nodes(parent, seen)
    return {type(n).__name__ for n in seen}


def test_problems_are_named():
    assert "--use_liger_kernel" in config_problem(use_liger_kernel=True, sharded=False)
    assert "DDP" in config_problem(use_liger_kernel=False, sharded=True)
    assert config_problem(use_liger_kernel=False, sharded=False) is None
    model = tiny()
    assert model_problem(model) is None
    model.model.extra = torch.nn.Conv1d(4, 4, 3)  # a trainable parameter kind the scores do not cover
    assert "Conv1d" in model_problem(model)
    with pytest.raises(ValueError, match="Conv1d"):
        InfluenceScorer(model, [rows_batch(10)])


def test_through_a_ddp_wrapper(float64_norms, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    model = tiny()
    params = trainable(model, "all")
    reference_batches = [rows_batch(10)]
    batch = rows_batch(0)
    brute = brute_scores(model, batch, params, brute_reference_gradient(model, reference_batches, params))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        scorer = InfluenceScorer(wrapped, reference_batches)  # the reference gradient runs on the unwrapped model
        for step in range(2):  # DDP raises on the second step if the first left a parameter without gradient
            scorer.refresh(step)
            ours = scored_step(scorer, wrapped, batch)
            model.zero_grad(set_to_none=True)
        assert_scores_equal(ours, brute)
    finally:
        dist.destroy_process_group()
