"""LoRA through peft on a tiny Gemma 3 (CPU): counts, targets, trainable tokens with the tied
embedding, merging, save/load, gradient checkpointing and the lean loss with a frozen head.

References are independent of the code under test: parameter counts from the base model's layer
shapes (LoRA adds A: r x in and B: out x r per layer), the model's own transformers loss, peft's
own loading (AutoPeftModelForCausalLM), and the base checkpoint's file size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from tuner import lora  # noqa: E402
from tuner import loss as lean_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TOKENS = [2, 100, 300]  # <bos> and two ordinary tokens of the tiny 512-token vocabulary


def load_base(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def wrap(path, tokens=None, r=4, dropout=0.0, target_modules=lora.ALL_LINEAR, gradient_checkpointing=False):
    torch.manual_seed(0)
    config = lora.build_lora_config(r=r, alpha=2 * r, dropout=dropout, target_modules=target_modules, token_ids=tokens)
    return lora.apply_lora(load_base(path), config, gradient_checkpointing=gradient_checkpointing)


def make_batch(seed=0, batch=2, seq=24, vocab=512):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (batch, seq), generator=generator)
    input_ids[:, ::5] = torch.tensor(TOKENS).repeat(seq)[: input_ids[:, ::5].shape[1]]  # the trained tokens occur
    labels = input_ids.clone()
    labels[0, :3] = -100  # a masked prompt
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def train_steps(model, steps=3, lr=1e-2):
    """A few AdamW steps, as the Trainer takes them (weight decay on): LoRA B and token rows move."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    for step in range(steps):
        loss, _ = lean_loss.compute_causal_lm_loss(model, make_batch(seed=step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# --- counts and targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [None, TOKENS], ids=["lora", "lora+tokens"])
def test_trainable_count_matches_layer_shapes_and_meta_estimate(tiny_model, tokens):
    base = load_base(tiny_model)
    hidden, r = base.config.hidden_size, 8
    linear = [m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    expected = sum(r * (m.in_features + m.out_features) for m in linear) + len(tokens or []) * hidden
    config = lora.build_lora_config(r=r, alpha=16, token_ids=tokens)
    model = lora.apply_lora(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    estimate = lora.count_trainable_parameters(base.config, config)
    assert estimate["trainable_parameters"] == expected
    assert estimate["trainable_percent"] == pytest.approx(100 * expected / estimate["parameters"])


def test_all_linear_is_every_projection_and_not_the_head(tiny_model):
    model = wrap(tiny_model)
    targeted = model.targeted_module_names
    assert {name.rsplit(".", 1)[-1] for name in targeted} == PROJECTIONS
    assert len(targeted) == len(PROJECTIONS) * model.config.num_hidden_layers
    assert not any("lm_head" in name or "embed" in name for name in targeted)
    base = model.get_base_model()
    assert isinstance(base.lm_head, torch.nn.Linear) and not base.lm_head.weight.requires_grad
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []


def test_a_fresh_adapter_leaves_the_outputs_unchanged(tiny_model):
    """LoRA B starts at 0 and token rows at their base values: the base model's logits, also through
    Gemma 3's scaled embedding (peft < 0.18 dropped its sqrt(hidden) factor for trainable tokens)."""
    inputs = make_batch()
    inputs.pop("labels")
    with torch.no_grad():
        expected = load_base(tiny_model)(**inputs).logits
        got = wrap(tiny_model, tokens=TOKENS).eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_comma_list_targets_only_those(tiny_model):
    model = wrap(tiny_model, target_modules="q_proj, v_proj")
    assert {name.rsplit(".", 1)[-1] for name in model.targeted_module_names} == {"q_proj", "v_proj"}


def test_log_says_count_and_percent(tiny_model, caplog):
    caplog.set_level("INFO", logger="tuner.lora")
    model = wrap(tiny_model, tokens=TOKENS)
    trainable, total = model.get_nb_trainable_parameters()
    assert f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)" in caplog.text


# --- checks before weights load -----------------------------------------------------------------


def test_bad_target_modules_are_named_with_the_modules_that_exist(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    assert lora.target_module_problems(config, "all-linear") == []
    assert lora.target_module_problems(config, "q_proj,self_attn.v_proj") == []
    (problem,) = lora.target_module_problems(config, "q_proj,qproj")
    assert problem.startswith("--lora_target_modules q_proj,qproj: qproj matches no module")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in problem and "lm_head" not in problem
    tied = lora.target_module_problems(config, "lm_head,embed_tokens")
    assert len(tied) == 2 and all("(tied)" in p and "--lora_trainable_tokens" in p for p in tied)
    assert "lm_head is the output head" in tied[0] and "embed_tokens is the embedding" in tied[1]
    (norm,) = lora.target_module_problems(config, "q_norm")
    assert "q_norm is a Gemma3RMSNorm, not a linear layer" in norm


def test_trainable_token_checks(tiny_model):
    tokenizer = tokenizer_of(tiny_model)
    assert lora.trainable_token_ids("<eos>, 100,<bos>,100", tokenizer) == [1, 100, 2]
    assert lora.trainable_token_ids(["<pad>", 7, "<unk>"], tokenizer) == [0, 7, 3]  # <unk> is a token too
    problems = lora.trainable_token_problems("<eos>,not one token,512,-1", tokenizer, vocab_size=512)
    assert len(problems) == 3
    assert "'not one token' is not a single token of the tokenizer (it splits into" in problems[0]
    assert "token id 512 is out of range; the embedding has ids 0 to 511" in problems[1]
    assert "token id -1 is out of range" in problems[2]
    assert all(p.startswith("--lora_trainable_tokens <eos>,not one token,512,-1: ") for p in problems)
    with pytest.raises(ValueError):
        lora.trainable_token_ids("<nope>", tokenizer)


def test_model_problems_collects_both(tiny_model):
    from transformers import AutoConfig

    problems = lora.model_problems(AutoConfig.from_pretrained(tiny_model), tokenizer_of(tiny_model), "q_prj", "99999")
    assert [p.split(":")[0] for p in problems] == ["--lora_target_modules q_prj", "--lora_trainable_tokens 99999"]


def test_option_problems():
    ok = dict(use_lora=True, merge_lora=True, r=16, alpha=32, dropout=0.05, target_modules="all-linear", trainable_tokens=None)
    assert lora.option_problems(**ok) == []
    assert lora.option_problems(**{**ok, "use_lora": False}) == [
        "--merge_lora: there is no adapter to merge without --use_lora. Add --use_lora, or drop --merge_lora."
    ]
    unused = lora.option_problems(**{**ok, "use_lora": False, "merge_lora": False, "r": 8, "trainable_tokens": "105"})
    assert unused == [
        "--lora_r: has no effect without --use_lora. Add --use_lora, or drop --lora_r.",
        "--lora_trainable_tokens: has no effect without --use_lora. Add --use_lora, or drop --lora_trainable_tokens.",
    ]
    bad = lora.option_problems(**{**ok, "r": 0, "alpha": 0, "dropout": 1.0, "target_modules": " , "})
    assert [p.split(" ")[0] for p in bad] == ["--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules"]


# --- trainable tokens, merge, save and load -----------------------------------------------------


def test_trainable_tokens_train_only_their_rows_and_keep_the_embedding_tied(tiny_model, tmp_path):
    base_embedding = load_base(tiny_model).get_input_embeddings().weight.detach().clone()
    model = wrap(tiny_model, tokens=TOKENS, dropout=0.05)
    inner = model.get_base_model()
    # One (k x hidden) parameter, shared by the embedding's and the head's token adapters.
    (delta,) = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert delta.shape == (len(TOKENS), inner.config.hidden_size)
    head_delta = inner.lm_head.token_adapter.trainable_tokens_delta["default"]
    assert head_delta is inner.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    train_steps(model)
    frozen = inner.model.embed_tokens.token_adapter.base_layer.weight
    assert not frozen.requires_grad and torch.equal(frozen, base_embedding)
    model.save_pretrained(tmp_path / "adapter")
    merged = lora.save_merged(model, tokenizer_of(tiny_model), tmp_path / "merged")
    weight = merged.get_input_embeddings().weight
    assert merged.get_output_embeddings().weight is weight
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[TOKENS] = False
    assert torch.equal(weight[others], base_embedding[others])  # bitwise
    assert not torch.equal(weight[TOKENS], base_embedding[TOKENS])
    # On disk: one copy of the tied matrix; the adapter holds only the k rows, not the embedding.
    from safetensors import safe_open

    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert [shape for key, shape in shapes.items() if "trainable_tokens" in key] == [(len(TOKENS), delta.shape[1])]
    assert max(shape[0] for shape in shapes.values()) < weight.shape[0]


@pytest.mark.parametrize("tokens", [None, TOKENS], ids=["lora", "lora+tokens"])
def test_merged_model_equals_adapter_model_and_base_size(tiny_model, tmp_path, tokens):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model = train_steps(wrap(tiny_model, tokens=tokens))
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    inputs = make_batch(seed=9)
    inputs.pop("labels")
    with torch.no_grad():
        in_memory = model(**inputs).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        from_adapter = adapter(**inputs).logits
    torch.testing.assert_close(from_adapter, in_memory, rtol=0, atol=1e-5)
    lora.save_merged(model, tokenizer_of(tiny_model), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, from_adapter, rtol=0, atol=1e-4)
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= files
    size = (tmp_path / "merged" / "model.safetensors").stat().st_size
    assert size == (Path(tiny_model) / "model.safetensors").stat().st_size


def test_merged_model_is_stored_in_the_base_dtype(tiny_model, tmp_path):
    """A bf16 base (as on the hub) trained in fp32 is merged in fp32 and saved in bf16: the base's size."""
    from transformers import AutoConfig

    load_base(tiny_model).to(torch.bfloat16).save_pretrained(tmp_path / "base16")
    tokenizer_of(tiny_model).save_pretrained(tmp_path / "base16")
    base_dtype = AutoConfig.from_pretrained(tmp_path / "base16").dtype  # read before the weights load
    model = train_steps(wrap(tmp_path / "base16", tokens=TOKENS))
    assert model.get_base_model().model.embed_tokens.token_adapter.base_layer.weight.dtype == torch.float32
    lora.save_merged(model, tokenizer_of(tiny_model), tmp_path / "merged", dtype=base_dtype)
    merged_size = (tmp_path / "merged" / "model.safetensors").stat().st_size
    assert merged_size == (tmp_path / "base16" / "model.safetensors").stat().st_size


# --- gradient checkpointing, the lean loss, bf16 --------------------------------------------------


def loss_grads(model, batch, lean):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same LoRA dropout masks in every variant
    loss = lean_loss.compute_causal_lm_loss(model, batch)[0] if lean else model(**batch).loss
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("tokens", [None, TOKENS], ids=["lora", "lora+tokens"])
@pytest.mark.parametrize("reentrant", [None, True, False], ids=["no-gc", "gc-reentrant", "gc"])
def test_gradient_checkpointing_and_lean_loss_give_the_standard_gradients(tiny_model, tokens, reentrant):
    """Reference: transformers' own loss without checkpointing. Checked: our chunked loss, with and
    without checkpointing (enabled as the Trainer does), LoRA dropout on."""
    batch = make_batch()
    reference = wrap(tiny_model, tokens=tokens, dropout=0.05).train()
    expected_loss, expected = loss_grads(reference, batch, lean=False)
    model = wrap(tiny_model, tokens=tokens, dropout=0.05, gradient_checkpointing=reentrant is not None).train()
    if reentrant is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.get_base_model().is_activation_checkpointing
    loss, got = loss_grads(model, batch, lean=True)
    torch.testing.assert_close(loss, expected_loss)
    assert got.keys() == expected.keys() and len(got) == sum(p.requires_grad for p in model.parameters())
    for name, grad in got.items():
        assert grad.abs().sum() > 0 or "lora_A" in name, name  # B starts at 0, so A's first gradient is 0
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("tokens", [None, TOKENS], ids=["frozen-head", "token-rows"])
def test_lean_loss_skips_the_frozen_heads_weight_gradient(tiny_model, monkeypatch, tokens):
    needs = []
    original = lean_loss._loss_and_grads

    def spy(*args, **kwargs):
        needs.append(tuple(args[5] if len(args) > 5 else kwargs["need"]))  # (hidden, weight, targets, softcap, chunk, need, ...)
        return original(*args, **kwargs)

    monkeypatch.setattr(lean_loss, "_loss_and_grads", spy)
    model = wrap(tiny_model, tokens=tokens).train()
    batch = make_batch()
    count = int((batch["labels"][:, 1:] != -100).sum())
    loss, _ = lean_loss.compute_causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(count))
    loss.backward()
    # Frozen head: only the hidden states' gradient. With token rows, the head's (merged) weight
    # needs one, and peft routes it to the k trained rows.
    assert needs == [(True, tokens is not None)]
    torch.testing.assert_close(loss.detach(), model(**batch).loss.detach())


def test_bf16_autocast_trains_the_adapter(tiny_model):
    model = wrap(tiny_model, tokens=TOKENS).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = lean_loss.compute_causal_lm_loss(model, make_batch())
    loss.backward()
    got = grads(model)
    assert torch.isfinite(loss) and got
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got.values())


# --- the real Gemma 3 270M's config and tokenizer (no weights) -----------------------------------


@pytest.mark.slow
def test_real_gemma_turn_tokens_and_count():
    from transformers import AutoConfig

    from tuner.offline import ensure_checkpoint

    path = ensure_checkpoint()
    config, tokenizer = AutoConfig.from_pretrained(path), tokenizer_of(path)
    assert lora.trainable_token_ids("<start_of_turn>,<end_of_turn>", tokenizer) == [105, 106]
    assert lora.model_problems(config, tokenizer, "all-linear", "<start_of_turn>,<end_of_turn>") == []
    h, q, kv, i, layers = 640, 4 * 256, 256, 2048, 18
    per_layer = 16 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    counts = lora.count_trainable_parameters(config, lora.build_lora_config(token_ids=[105, 106]))
    assert counts["trainable_parameters"] == layers * per_layer + 2 * h


@pytest.mark.slow
def test_lora_recipe_options_are_valid():
    import yaml
    from transformers import AutoConfig

    from tuner.offline import ensure_checkpoint

    recipe = yaml.safe_load((ROOT / "configs" / "lora-sft.yaml").read_text())
    options = {key: recipe.get(f"lora_{key}", default) for key, default in
               [("r", 16), ("alpha", 32), ("dropout", 0.05), ("target_modules", "all-linear"), ("trainable_tokens", None)]}  # fmt: skip
    assert lora.option_problems(recipe["use_lora"], recipe.get("merge_lora", False), **options) == []
    path = ensure_checkpoint()
    problems = lora.model_problems(AutoConfig.from_pretrained(path), tokenizer_of(path), options["target_modules"], options["trainable_tokens"])
    assert problems == []
    assert recipe["learning_rate"] >= 5 * 2e-5  # LoRA takes a learning rate about 10x full fine-tuning's
