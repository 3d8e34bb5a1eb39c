"""lora2.py in an LLM practitioner's loop, on tiny random decoders (Llama, GPT-2, Qwen2 with tied
embeddings) on the CPU: a bf16 base with fp32 adapters under bf16 autocast with R and the Pruner;
gradient checkpointing in both modes; torch.compile; the adapter state and the PEFT export round
trips."""
import copy

import pytest
import torch
import torch.nn.functional as F

import lora2

transformers = pytest.importorskip("transformers")

ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DECODERS = {  # name: (config, the linear layers a practitioner adapts)
    "llama": (lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64), ATTENTION_MLP),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96,
                                             n_positions=64, bos_token_id=0, eos_token_id=0),
             ["c_attn", "c_proj", "c_fc"]),
    "qwen2": (lambda: transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True),
              ATTENTION_MLP),
}


def decoder(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config, targets = DECODERS[name]
    return transformers.AutoModelForCausalLM.from_config(config()).to(dtype).train(), targets


def batch(seed=0, size=(2, 12)):
    ids = torch.randint(0, 96, size, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_bf16_base_fp32_adapters_under_autocast_with_R_and_the_pruner(name):
    """A whole schedule (L7) in the step order of SPEC §4 under bf16 autocast: the loss stays finite
    and falls on a repeated batch, the adapters stay fp32 and the base bf16 and untouched, and the
    run ends at b_T."""
    model, targets = decoder(name, torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora2.inject(model, targets, r=4, k=4, alpha=8, trainable=())
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    T = 14
    pruner = lora2.Pruner(model, target_rank=2, total_steps=T, init_warmup=1, final_warmup=4,
                          mask_interval=2)
    losses = []
    for t in range(T):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch()).loss + 0.1 * lora2.orthogonal_regularizer(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        pruner.step(t)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert (all(map(torch.isfinite, map(torch.tensor, losses)))
            and losses[-1] < losses[0] - 0.1), losses
    assert sum(map(sum, lora2.rank_pattern(model).values())) == pruner.bT
    for n, p in model.named_parameters():
        if not p.requires_grad:
            original = base[n.replace(".base.", ".")]
            assert p.dtype == torch.bfloat16 and torch.equal(p, original), n


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant):
    """transformers' gradient checkpointing, reentrant or not, gives the adapter gradients of the
    plain forward (fp32, so that they agree to rounding), with R in the loss and over two
    accumulated backward passes."""
    grads = []
    for checkpointing in (False, True):
        model, targets = decoder("llama")
        lora2.inject(model, targets, r=4, k=4, trainable=())
        with torch.no_grad():
            for m in lora2.lora2_modules(model).values():
                m.lambda_.copy_(torch.linspace(-1.0, 1.0, m.r))  # ΔW ≠ 0
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        for seed in (0, 1):
            (model(**batch(seed)).loss + 0.1 * lora2.orthogonal_regularizer(model)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 5
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_torch_compile_traces_the_adapted_model_in_one_graph():
    """torch.compile(model) on an adapted Llama, training mode under bf16 autocast: one graph, no
    break (inside a compiled graph the layers compute their own pairs)."""
    model, targets = decoder("llama", torch.bfloat16)
    lora2.inject(model, targets, r=4, k=4, trainable=())
    try:
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explained = torch._dynamo.explain(model)(**batch())
        assert (explained.graph_count == 1
                and explained.graph_break_count == 0), explained.break_reasons
    finally:
        torch._dynamo.reset()


def train_a_little(model, targets, trainable=(), steps=4):
    lora2.inject(model, targets, r=4, k=4, trainable=trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for seed in range(steps):
        model(**batch(seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_adapter_state_and_peft_export_round_trip(name, tmp_path):
    """adapter_state_dict of a trained model, loaded into the same base freshly injected, gives its
    logits; and the PEFT export (peft_state_dict) loads onto the untouched base in PEFT with the
    same logits (fp32)."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file
    base, targets = decoder(name)
    base.eval()
    model = train_a_little(copy.deepcopy(base), targets)
    ids = batch(9)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    fresh = copy.deepcopy(base)
    lora2.inject(fresh, targets, r=4, k=4, trainable=())
    lora2.load_adapter_state_dict(fresh, lora2.adapter_state_dict(model))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, logits)
    state, config = lora2.peft_state_dict(model)
    save_file(state, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(__import__("json").dumps(config))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_a_tied_lm_head_named_in_trainable_trains():
    """inject(..., trainable=["lm_head"]) on a model whose lm_head is the embedding matrix
    (Qwen2-style tying): the tied tensor is listed under the embedding's name, and was never made
    trainable; it is now, under either name, and the adapter state carries it back."""
    base, targets = decoder("qwen2")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = train_a_little(copy.deepcopy(base), targets, trainable=["lm_head"])
    assert (model.lm_head.weight.requires_grad
            and not torch.equal(model.lm_head.weight, base.lm_head.weight))
    state = lora2.adapter_state_dict(model)
    assert "model.embed_tokens.weight" in state  # the tensor's first name
    fresh = copy.deepcopy(base)
    lora2.inject(fresh, targets, r=4, k=4, trainable=["lm_head"])
    lora2.load_adapter_state_dict(fresh, state)
    ids = batch(3)["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied


def test_the_pruner_steps_from_a_trainer_callback(tmp_path):
    """The README's recipe for transformers' Trainer: step the Pruner from
    TrainerCallback.on_optimizer_step, which runs after optimizer.step() and before the gradients
    are zeroed, with state.global_step. A tiny Trainer run ends at b_T without a warning; the same
    from on_step_end (after zero_grad) warns that nothing was scored."""
    model, targets = decoder("llama")
    lora2.inject(model, targets, r=4, k=4, trainable=())
    T = 8
    pruner = lora2.Pruner(model, target_rank=2, total_steps=T, init_warmup=1, final_warmup=3,
                          mask_interval=2)

    class PrunerCallback(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            pruner.step(state.global_step)

    class LateCallback(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            late.step(state.global_step)

    data = [{k: v[0] for k, v in batch(seed, (1, 12)).items()} for seed in range(T * 2)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=T,
                                          per_device_train_batch_size=2, learning_rate=1e-2,
                                          save_strategy="no", report_to=[], use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Pruner")
        transformers.Trainer(model=model, args=args, train_dataset=data,
                             callbacks=[PrunerCallback()]).train()
    assert (pruner.last_step == T - 1
            and sum(map(sum, lora2.rank_pattern(model).values())) == pruner.bT)
    other, _ = decoder("llama")
    lora2.inject(other, targets, r=4, k=4, trainable=())
    late = lora2.Pruner(other, target_rank=2, total_steps=T, init_warmup=1, final_warmup=3,
                        mask_interval=2)
    with pytest.warns(UserWarning, match="no scored factor has a gradient"):
        transformers.Trainer(model=other, args=args, train_dataset=data,
                             callbacks=[LateCallback()]).train()
