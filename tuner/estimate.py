"""The numbers `--dry_run` prints: batch and step arithmetic, data size, parameter count and an
estimate of peak memory per device, all computed without loading a single weight.

The memory figure is an estimate, not a measurement. Its activation formula was calibrated on
Gemma 3 by counting the bytes of every tensor autograd saves in a forward pass through our loss
(CPU, sdpa): for the Gemma 3 270M config at 512 tokens the estimate of activations + loss buffers +
autocast copies came within 0.3% of that count, in fp32 and with bf16 autocast. It leaves out the
CUDA context, allocator fragmentation and the short-lived buffers of the backward pass.
"""

from __future__ import annotations

from tuner import distill, lora
from tuner.common import step_counts, text_config  # noqa: F401  (step_counts: callers use estimate's name)
from tuner.config import checkpointing
from tuner.loss import default_chunk_size

GiB = 2**30
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size and dtype of the parameter
LOGIT_BUFFERS = 3  # logits, their fp32 log-softmax, their gradient: (tokens x vocab) each


def count_parameters(model_config) -> dict:
    """Parameter counts of the model built on the meta device: no memory, no weights read.

    `torch.device("meta")` rather than accelerate's init_empty_weights: with transformers 5.23 the
    latter leaves lm_head untied from the embeddings, counting Gemma 3 270M as 436M parameters.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    model.tie_weights()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return {
        "parameters": sum(p.numel() for p in model.parameters()),  # a tied tensor is yielded once
        "embedding_parameters": embedding.numel(),
        "tied_embeddings": tied,
    }


def loss_chunk_tokens(vocab_size: int) -> int:
    return default_chunk_size(vocab_size)


def activation_bytes_per_token(model_config, compute_bytes: int, autocast: bool, attention: str, seq_len: int) -> dict:
    """Bytes autograd saves per token: {'layer': one decoder layer, 'outside': embeddings and final norm}.

    Per layer, in elements, with h hidden, q = heads x head_dim, k = kv_heads x head_dim, i the MLP
    width and s the sequence length (no dropout: Gemma has none):
      8h + 2q + 2k  fp32 always: residual stream and RMSNorm internals (Gemma normalises in fp32)
      2h + 2q + 2k + 4i  in the compute dtype: projections' inputs and outputs, q/k/v after rope,
                    attention output, gate, up, act(gate), act(gate)*up
      3h + q        bf16 copies autocast makes of matmul inputs (only with fp32 weights + --bf16)
      s             sdpa turns each masked (sliding-window) layer's boolean mask into a float copy
                    and saves it; flash_attention_2 needs none
      heads x s     eager attention keeps the (s x s) softmax of every head, fp32
    Checked against the saved tensors of a Gemma 3 layer (h 640, 4 x 256 heads, i 2048, s 512):
    within 1% in fp32, bf16 autocast and bf16 weights. Korthikanti et al. (2022) give 34h + 5as
    bytes for GPT in fp16 with dropout; ours has no dropout, sdpa stores no (s x s) matrix, and
    Gemma's four norms per layer and wider, gated MLP cost more.
    """
    text = text_config(model_config)
    h, i = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    q, k = heads * head_dim, kv_heads * head_dim
    per_layer = 4 * (8 * h + 2 * q + 2 * k) + compute_bytes * (2 * h + 2 * q + 2 * k + 4 * i)
    if autocast:
        per_layer += 2 * (3 * h + q)
    if attention == "eager":
        per_layer += 4 * heads * seq_len
    elif attention != "flash_attention_2":
        masked = sum(t != "full_attention" for t in getattr(text, "layer_types", None) or [])
        per_layer += compute_bytes * seq_len * masked / text.num_hidden_layers  # averaged over layers
    return {"layer": per_layer, "outside": 4 * 4 * h}


def memory_estimate(cfg, model_config, params: dict, world_size: int, teacher_config=None) -> dict:
    """Peak bytes per device, by component. fp32 master weights unless --use_flash_attention (bf16)."""
    text = text_config(model_config)
    weight_bytes = 2 if cfg.use_flash_attention else 4  # models.attention_and_dtype
    autocast = (cfg.bf16 or cfg.fp16) and weight_bytes == 4
    compute_bytes = 2 if (cfg.bf16 or cfg.fp16 or weight_bytes == 2) else 4
    attention = "flash_attention_2" if cfg.use_flash_attention else (cfg.attn_implementation or "sdpa")
    tokens = cfg.per_device_train_batch_size * cfg.max_seq_length  # one micro-batch
    per_token = activation_bytes_per_token(model_config, compute_bytes, autocast, attention, cfg.max_seq_length)
    layers = text.num_hidden_layers
    if checkpointing(cfg):
        # Each layer's input is kept (the residual stream); one layer at a time is recomputed.
        kept = layers * text.hidden_size * weight_bytes + per_token["layer"]
    else:
        kept = layers * per_token["layer"]
    n, vocab = params["parameters"], text.vocab_size
    trainable = params.get("trainable_parameters", n)  # LoRA: gradients and optimizer state for the adapter only
    head_matrix = vocab * text.hidden_size * 4  # one fp32 (vocab x hidden) buffer
    # Ours holds the fp32 gradient of lm_head, computed in the forward, until backward (tuner/loss.py);
    # a frozen head (LoRA) skips it, and peft's trainable token rows make three dense copies instead.
    head_gradient = head_matrix if not cfg.use_lora else 3 * head_matrix if cfg.lora_trainable_tokens else 0
    chunk = min(loss_chunk_tokens(vocab), tokens)
    memory = {
        # Under autocast the bf16 copy of every matmul weight is saved for backward. That includes
        # the tied embedding: the model still runs lm_head, on zero positions (tuner/loss.py).
        "weights": n * weight_bytes + (2 * n if autocast else 0),
        "gradients": trainable * weight_bytes,
        "optimizer": ADAMW_STATES * trainable * weight_bytes,
        "activations": int(tokens * (kept + per_token["outside"])),
        # Both losses upcast logits to fp32.
        "logits": LOGIT_BUFFERS * chunk * vocab * 4 + head_gradient,
    }
    if world_size > 1:
        memory["ddp_buckets"] = trainable * weight_bytes  # DDP's flat all-reduce buffers: one more gradient copy
    if cfg.influence:
        # The reference gradient (one copy of the trainable parameters) stays; while it is computed, the
        # activations of one reference batch (eval mode: never checkpointed, tuner/influence.py) stand
        # in for the training step's, which do not exist yet: only their excess counts.
        reference = cfg.per_device_eval_batch_size * cfg.max_seq_length * (layers * per_token["layer"] + per_token["outside"])
        memory["influence"] = trainable * weight_bytes + max(0, int(reference) - memory["activations"])
    if teacher_config is not None:
        teacher = teacher_memory(teacher_config, compute_bytes, cfg.per_device_train_batch_size, cfg.max_seq_length, attention)
        # Its chunk buffers replace the plain loss's; its forward runs before the student's, so only
        # its excess over the student's activations reaches the peak.
        memory["logits"] += teacher["chunk_buffers"] - LOGIT_BUFFERS * chunk * vocab * 4
        memory["teacher"] = teacher["weights"] + teacher["hidden"] + max(0, teacher["forward"] - memory["activations"])
    memory["total"] = sum(memory.values())
    return {
        "memory": memory,
        "standard_loss_logits": LOGIT_BUFFERS * tokens * vocab * 4,
        "head_gradient": ("" if not head_gradient else ", + lm_head's fp32 gradient" if not cfg.use_lora
                          else ", + 3 fp32 (vocab x hidden) copies for peft's trainable token rows"),  # fmt: skip
        "loss_chunk_tokens": chunk,
        "micro_batch_tokens": tokens,
        "vocab_size": vocab,
        "weight_dtype": "bfloat16" if weight_bytes == 2 else "float32",
        "compute_dtype": "float16" if cfg.fp16 else "bfloat16" if compute_bytes == 2 else "float32",
        "autocast": autocast,
        "attention": attention,
    }


def estimate(cfg, model_config, datasets, world_size: int, tokenizer=None, teacher_config=None) -> dict:
    """Every derived number of the run, without loading weights. `datasets` is a tuner.data.datasets.Datasets;
    `teacher_config` the teacher's config.json with --teacher_model_name_or_path."""
    train_chunks = datasets.train_chunks  # None for a stream
    params = count_parameters(model_config)
    if cfg.use_lora:
        params.update(lora.count_trainable_parameters(model_config, lora.config_from_options(cfg, tokenizer)))
    return {
        "world_size": world_size,
        **step_counts(cfg, train_chunks, world_size),
        "train_chunks": train_chunks,
        "train_tokens": datasets.train_tokens,
        "eval_chunks": len(datasets.eval) if datasets.eval is not None else 0,
        "eval_tokens": datasets.eval_tokens,
        "data_format": datasets.format, "packed": datasets.packed, "data_figures": datasets.figures,
        "preview": datasets.preview,
        **params,
        **memory_estimate(cfg, model_config, params, world_size, teacher_config),
    }


def size(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB / 10 else f"{n_bytes / 2**20:.1f} MiB"


def count(value: int | None) -> str:
    return "unknown (streaming)" if value is None else f"{value:,}"


def format_report(cfg, numbers: dict) -> str:
    """The derived numbers as an aligned block, nanoGPT style."""
    n, m = numbers, numbers["memory"]
    epochs = f"{cfg.num_train_epochs:g} epochs" if cfg.max_steps <= 0 else "--max_steps"
    if cfg.max_steps > 0 and n["epochs"] is not None:
        epochs += f"; {n['epochs']:.2f} epochs"
    facts = [
        ("world size", f"{n['world_size']} process(es)"),
        ("effective batch", f"{n['effective_batch_sequences']:,} sequences = {cfg.per_device_train_batch_size} per device"
         f" x {cfg.gradient_accumulation_steps} accumulation x {n['world_size']} process(es)"),
        ("tokens per optimizer step", f"{n['effective_batch_tokens']:,} = {n['effective_batch_sequences']:,} x {cfg.max_seq_length}"),
        ("train data", f"{n['train_tokens']:,} tokens in {count(n['train_chunks'])} {rows_of(n, cfg.max_seq_length)}"),
        ("eval data", f"{n['eval_tokens']:,} tokens in {n['eval_chunks']:,} {rows_of(n, cfg.max_seq_length)}"),
        ("steps per epoch", count(n["steps_per_epoch"])),
        ("total steps", f"{count(n['total_steps'])} ({epochs})"),
        ("parameters", f"{n['parameters']:,} (embedding {n['embedding_parameters']:,}"
         f"{', tied with lm_head: counted once' if n['tied_embeddings'] else ''})"),
        *([("trainable (LoRA)", f"{n['trainable_parameters']:,} ({n['trainable_percent']:.2f}%)")] if cfg.use_lora else []),
    ]  # fmt: skip
    copies = f" + {n['compute_dtype']} autocast copies" if n["autocast"] else ""
    recompute = ", gradient checkpointing" if checkpointing(cfg) else ""
    memory = [
        ("weights", m["weights"], n["weight_dtype"] + copies),
        ("gradients", m["gradients"], n["weight_dtype"] + (", trainable (LoRA) only" if cfg.use_lora else "")),
        ("optimizer state", m["optimizer"], f"AdamW: {ADAMW_STATES} states, {n['weight_dtype']}"),
        ("activations", m["activations"], f"{n['micro_batch_tokens']:,} tokens per micro-batch, {n['compute_dtype']}, "
         f"{n['attention']}{recompute}"),
        ("logits (chunked loss)", m["logits"], f"{n['loss_chunk_tokens']:,}-token chunks x {n['vocab_size']:,} vocab, "
         f"fp32 x 3{n['head_gradient']}" if "teacher" not in m else "distillation: CE and KL chunk by chunk, fp32 x 5"
         f"{n['head_gradient']}"),
    ]  # fmt: skip
    if "ddp_buckets" in m:
        memory.append(("DDP gradient buckets", m["ddp_buckets"], "one more gradient copy"))
    if "teacher" in m:
        memory.append(("teacher", m["teacher"], f"frozen {n['compute_dtype']} weights + its final hidden states"))
    if "influence" in m:
        memory.append(("influence", m["influence"], "reference gradient, + a reference batch's activations beyond a step's"))
    memory.append(("total", m["total"], ""))
    lines = ["Derived numbers:"] + [f"  {name:<28}{value}" for name, value in facts] + sft_lines(n) + mix_lines(n)
    lines.append("Peak memory per device: an ESTIMATE, not a measurement (add ~1 GiB for CUDA context and allocator):")
    lines += [f"  {name:<28}{size(b):>10}  {note}".rstrip() for name, b, note in memory]
    lines.append(
        f"  {'(standard loss)':<28}{size(n['standard_loss_logits']):>10}  for its logits alone: "
        f"{n['micro_batch_tokens']:,} tokens x {n['vocab_size']:,} vocab, fp32 x 3"
    )
    return "\n".join(lines)


def rows_of(numbers: dict, seq_len: int) -> str:
    """What a training row is: a fixed-length chunk, a packed row, or one example."""
    if numbers.get("data_format", "text") == "text":
        return f"chunks of {seq_len}"
    return f"packed rows of <= {seq_len}" if numbers["packed"] else "examples, one a row (padded per batch)"


def sft_lines(numbers: dict) -> list[str]:
    """Chat/instruction data: what tokenising kept, dropped and cut, how full the rows are, and the first
    examples with their trained tokens between [[ and ]]."""
    f = numbers.get("data_figures") or {}
    if numbers.get("data_format", "text") == "text" or not f or "sources" in f:  # a mix: mix_lines
        return []
    lines = [f"Data ({numbers['data_format']}):"]
    for split in ("train", "validation"):
        if f"{split}_examples_used" not in f:
            continue
        read = (
            f"{f[f'{split}_rows_read']:,} rows -> {f[f'{split}_examples']:,} examples; dropped {f[f'{split}_dropped_too_long']:,} "
            f"too long, {f[f'{split}_dropped_untrained']:,} with no trained token; {f[f'{split}_truncated']:,} truncated; "
        ) if f"{split}_rows_read" in f else "streamed: "  # fmt: skip
        used, tokens = f[f"{split}_examples_used"], f[f"{split}_tokens_used"]
        fill = f", fill {f[f'{split}_fill_ratio']:.1%}" if f"{split}_fill_ratio" in f else ""
        lines.append(
            f"  {split:<28}{read}using {used:,} examples in {f[f'{split}_rows_used']:,} rows{fill}, "
            f"{f[f'{split}_trained_tokens_used'] / max(tokens, 1):.1%} of {tokens:,} tokens trained"
        )
    if numbers.get("preview"):
        lines.append("First training examples, trained tokens between [[ and ]]:")
        lines += [f"  --- example {i}\n{text}" for i, text in enumerate(numbers["preview"])]
    return lines


def mix_lines(numbers: dict) -> list[str]:
    """Several sources (mix_data.py): each one's weight and share, format, rows and tokens, and what this run takes."""
    f = numbers.get("data_figures") or {}
    if "sources" not in f:
        return []
    mix, weights = f["mix"], sum(s["weight"] for s in f["sources"])
    unit = "trained tokens" if mix["unit"] == "tokens" else "training rows"
    lines = [f"Sources, mixed in proportions of {unit}; one that runs out "
             f"{'restarts' if mix['exhausted'] == 'restart' else 'ends the run'} (--mix_exhausted {mix['exhausted']}):"]
    for s in f["sources"]:
        examples = f" ({s['train_examples_used']:,} examples)" if "train_examples_used" in s else ""
        data = (f"{s['train_rows']:,} rows{examples}, {s['train_trained_tokens']:,} trained tokens" if s["train_rows"] is not None
                else "streamed (sizes unknown until read)")  # fmt: skip
        run = f"; this run: {s['run_trained_tokens']:,} trained tokens" if "run_trained_tokens" in s else ""
        lines.append(f"  {s['name']:<20}weight {s['weight']:g} ({s['weight'] / weights:.1%}), {s['format']}: {data}; "
                     f"eval {s['eval_rows']:,} rows, {s['eval_tokens']:,} tokens{run}")  # fmt: skip
    if "epoch_rows" in mix:
        lines.append(f"  {'rows':<20}an epoch of the mix {mix['epoch_rows']:,}; this run {mix['run_rows']:,}")
    if numbers.get("preview") and numbers.get("data_format") != "text":
        lines.append("First chat/instruction examples, trained tokens between [[ and ]]:")
        lines += [f"  --- example {i}\n{text}" for i, text in enumerate(numbers["preview"])]
    return lines


def dry_run_report(cfg, model_config, datasets, world_size: int) -> str:
    """What `--dry_run` prints after the resolved config."""
    return format_report(cfg, estimate(cfg, model_config, datasets, world_size))

def teacher_memory(teacher_config, weight_bytes: int, batch_size: int, seq_len: int, attention: str = "sdpa",
                   chunk_tokens: int | None = None) -> dict:  # fmt: skip
    """Bytes the teacher adds to a training step, by component, without loading its weights.

    weights        its parameters in its dtype (`weight_bytes` each; frozen: no gradient, no AdamW state)
    hidden         its final hidden states (B*T, Ht) kept for the loss, and their trained-row copy
    chunk_buffers  the distillation's distill.DISTILL_BUFFERS fp32 (chunk x vocab) buffers; they *replace* the
                   plain loss's (LOGIT_BUFFERS x its chunk) buffers, they do not add to them
    forward        transient, during its no-grad forward: the output_hidden_states tuple (layers + 1
                   tensors of (B*T, Ht)) and at most what one layer would save for backward. The
                   teacher runs before the student's forward, so this is at the step's peak only when
                   it exceeds the student's activations.
    The step's peak is about the plain estimate - its logit buffers + weights + hidden + chunk_buffers.
    """
    text = text_config(teacher_config)
    tokens = batch_size * seq_len
    chunk = min(chunk_tokens or distill.default_chunk_size(text.vocab_size), tokens)
    per_layer = activation_bytes_per_token(teacher_config, weight_bytes, autocast=False, attention=attention, seq_len=seq_len)["layer"]
    return {
        "weights": count_parameters(teacher_config)["parameters"] * weight_bytes,
        "hidden": 2 * tokens * text.hidden_size * weight_bytes,
        "chunk_buffers": distill.DISTILL_BUFFERS * chunk * text.vocab_size * 4,
        "forward": (text.num_hidden_layers + 1) * tokens * text.hidden_size * weight_bytes + int(tokens * per_layer),
        "chunk_tokens": chunk,
    }
