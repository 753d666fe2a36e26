"""NCATrainer against the materialised-logits reference: loss, gradients, reference pass, training."""

from __future__ import annotations

import functools

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from nca_kernels import ops, reference
from nca_kernels.trainer import NCACollator, NCAConfig, NCATrainer, add_reference_logps
from nca_kernels.trainer import reference as reference_pass

from .common import (  # noqa: F401
    HEADS,
    char_tokenizer,
    one_thread,
    reward_rows,
    tiny_llama,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(tmp_path, **kwargs):
    settings = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
                "per_device_eval_batch_size": 3, "learning_rate": 1e-3, "report_to": [], "save_strategy": "no",
                "disable_tqdm": True, "use_cpu": True, "beta": 0.5, "alpha": 0.3, "max_length": 64,
                "max_prompt_length": 32}
    return {**settings, **kwargs}


def make_trainer(tmp_path, model, rows, ref_model=None, **kwargs):
    return NCATrainer(model, NCAConfig(**_settings(tmp_path, **kwargs)), train_dataset=Dataset.from_list(rows),
                      processing_class=char_tokenizer(), ref_model=ref_model)


def naive_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return reference.sequence_logprobs_from_logits(logits[:, :-1], batch["labels"][:, 1:])


def batch_of(trainer, rows=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])


@pytest.mark.parametrize("build", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("loss_type,recompute", [("nca", True), ("infonca", True), ("nca", False)])
def test_loss_and_grads_match_full_logits(tmp_path, monkeypatch, build, loss_type, recompute):
    tok = char_tokenizer()
    trainer = make_trainer(tmp_path, build(len(tok)), reward_rows(4), loss_type=loss_type, recompute=recompute)
    model = trainer.model
    batch = batch_of(trainer)
    with torch.no_grad():  # move the policy away from the reference so the model rewards are not all 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grouped = []  # the group-chunked path runs exactly when recompute=False
    apply = ops.GroupedNCALoss.apply
    monkeypatch.setattr(ops.GroupedNCALoss, "apply", lambda *a: grouped.append(1) or apply(*a))
    loss = trainer.compute_loss(model, batch)
    assert len(grouped) == (not recompute)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logps = naive_logps(model, batch).view(4, 4)
    want = reference.nca_loss(logps, batch["ref_logps"], batch["rewards"], beta=0.5, alpha=0.3, loss_type=loss_type)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("build", HEADS.values(), ids=HEADS.keys())
def test_reference_logps_come_from_the_initial_policy(tmp_path, build):
    """The reference pass reads every kind of head (bias, logit scaling, softcap) as the model's own
    logits do, in row order over several batches; an explicit reference model replaces the policy."""
    tok = char_tokenizer()
    model = build(len(tok))
    trainer = make_trainer(tmp_path, model, reward_rows(5))
    collate = trainer.data_collator
    with torch.no_grad():
        want = naive_logps(model, collate([trainer.train_dataset[i] for i in range(5)])).view(5, 4)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_logps"]), want, rtol=1e-5, atol=1e-5)
    # An explicit reference model is used instead of the policy.
    other = build(len(tok), seed=1)
    trainer = make_trainer(tmp_path, build(len(tok)), reward_rows(5), ref_model=other)
    with torch.no_grad():
        want = naive_logps(other, collate([trainer.train_dataset[i] for i in range(5)])).view(5, 4)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_logps"]), want, rtol=1e-5, atol=1e-5)


PAIRS = [{"prompt": f"q{i}", "chosen": "a" * (i + 1), "rejected": "b"} for i in range(4)]


def test_pairwise_data_means_alpha_zero(tmp_path):
    tok = char_tokenizer()
    for loss_type, start in (("dpo", 1.0), ("nca_pair", 2.0)):
        trainer = make_trainer(tmp_path, tiny_llama(len(tok)), PAIRS, loss_type=loss_type, alpha=0.5)
        assert trainer.alpha == 0.0
        # At the start policy == reference, every model reward is 0: DPO gives log 2, nca_pair 2 log 2.
        loss = trainer.compute_loss(trainer.model, batch_of(trainer))
        torch.testing.assert_close(loss.item(), start * torch.log(torch.tensor(2.0)).item(), rtol=1e-5, atol=1e-6)


def _moved(model):
    with torch.no_grad():  # the policy away from the reference, so that alpha matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def _naive_loss(trainer, data, alpha):
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    with torch.no_grad():
        logps = naive_logps(trainer.model, batch).view(batch["rewards"].shape)
    return reference.nca_loss(logps, batch["ref_logps"], batch["rewards"], beta=0.5, alpha=alpha).item()


def test_each_dataset_keeps_its_own_alpha(tmp_path):
    """Pairwise evaluation data is scored with alpha=0; the reward-layout training data keeps the
    configured alpha (a pairwise eval set used to switch the training loss to alpha=0 too)."""
    tok = char_tokenizer()
    trainer = NCATrainer(tiny_llama(len(tok)), NCAConfig(**_settings(tmp_path)),
                         train_dataset=Dataset.from_list(reward_rows(4, k=2)), eval_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok)
    assert trainer.alpha == 0.3
    _moved(trainer.model)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(_naive_loss(trainer, trainer.eval_dataset, 0.0), rel=1e-5)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch_of(trainer))
    assert loss.item() == pytest.approx(_naive_loss(trainer, trainer.train_dataset, 0.3), rel=1e-5)


def test_named_and_raw_evaluation_sets(tmp_path):
    """A dict of eval sets is evaluated set by set; a raw dataset given to evaluate() or predict() is
    prepared like the others (after training only with its own reference log-probs); predict's
    metrics stay out of the next evaluate()."""
    tok = char_tokenizer()
    trainer = NCATrainer(tiny_llama(len(tok)), NCAConfig(**_settings(tmp_path, max_steps=1)),
                         train_dataset=Dataset.from_list(reward_rows(4)),
                         eval_dataset={"a": Dataset.from_list(reward_rows(3, seed=1)),
                                       "b": Dataset.from_list(reward_rows(5, seed=2))},
                         processing_class=tok)
    _moved(trainer.model)
    first = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_rewards/accuracy", "eval_b_logps/chosen"} <= set(first)
    assert first["eval_a_loss"] == pytest.approx(_naive_loss(trainer, trainer.eval_dataset["a"], 0.3), rel=1e-5)
    refs = trainer.eval_dataset["a"]["ref_logps"]
    with_ref = [{**r, "ref_logps": ref} for r, ref in zip(reward_rows(3, seed=1), refs)]
    predicted = trainer.predict(Dataset.from_list(with_ref))
    assert predicted.metrics["test_loss"] == pytest.approx(first["eval_a_loss"], rel=1e-6)
    assert "test_rewards/margin" in predicted.metrics
    again = trainer.evaluate()
    assert again["eval_a_logps/policy"] == pytest.approx(first["eval_a_logps/policy"], rel=1e-6)
    raw = trainer.evaluate(Dataset.from_list(reward_rows(3, seed=1)))  # before training: policy = reference
    assert raw["eval_rewards/margin"] == 0.0
    trainer.train()
    with pytest.raises(ValueError, match="has no ref_logps column"):  # after training the reference is gone
        trainer.evaluate(Dataset.from_list(reward_rows(3, seed=1)))


def test_named_sets_with_persistent_workers_and_weighted_metrics(tmp_path):
    """Each named set keeps its own data loader (and alpha) when loaders persist; metrics are means
    over prompts, a short last batch weighing by its size (5 prompts in batches of 3 and 2)."""
    tok = char_tokenizer()
    trainer = NCATrainer(tiny_llama(len(tok)),
                         NCAConfig(**_settings(tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True)),
                         train_dataset=Dataset.from_list(reward_rows(4)),
                         eval_dataset={"pairs": Dataset.from_list(PAIRS), "k4": Dataset.from_list(reward_rows(5))},
                         processing_class=tok)
    _moved(trainer.model)
    metrics = trainer.evaluate()
    assert "eval_pairs_rewards/rank2" not in metrics and "eval_k4_rewards/rank3" in metrics
    assert metrics["eval_k4_loss"] == pytest.approx(_naive_loss(trainer, trainer.eval_dataset["k4"], 0.3), rel=1e-5)
    assert metrics["eval_pairs_loss"] == pytest.approx(_naive_loss(trainer, trainer.eval_dataset["pairs"], 0.0),
                                                       rel=1e-5)
    assert (metrics["eval_k4_rewards/accuracy"] * 5) == pytest.approx(round(metrics["eval_k4_rewards/accuracy"] * 5))


def test_models_without_a_decoder_return_their_hidden_states(tmp_path, monkeypatch):
    """The loss reads the decoder's output through a hook; a model whose decoder cannot be found
    returns its hidden states instead, with the same loss. The forward is asked for the logits of the
    last position only."""
    tok = char_tokenizer()
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(4))
    _moved(trainer.model)
    batch = batch_of(trainer)
    hooked = trainer.compute_loss(trainer.model, batch)
    asked = []
    forward = type(trainer.model).forward

    @functools.wraps(forward)  # keeps the signature the loss reads
    def spy(self, **kwargs):
        asked.append(kwargs)
        return forward(self, **kwargs)

    monkeypatch.setattr(type(trainer.model), "forward", spy)
    monkeypatch.setattr(type(trainer.model), "get_decoder", lambda self: self)
    plain = trainer.compute_loss(trainer.model, batch)
    assert asked[-1].get("output_hidden_states") is True and asked[-1].get("logits_to_keep") == 1
    torch.testing.assert_close(plain, hooked, rtol=1e-6, atol=1e-7)


def test_reference_logps_in_the_data_are_used(tmp_path):
    tok = char_tokenizer()
    rows = [{**r, "ref_logps": [-1.0 - i, -2.0, -3.0, -4.0]} for i, r in enumerate(reward_rows(3))]
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), rows)
    assert trainer.train_dataset["ref_logps"] == [r["ref_logps"] for r in rows]


def test_mixed_precision_runs_the_head_in_its_dtype(tmp_path, monkeypatch):
    """Under bf16 autocast the fused loss receives the decoder's own hidden states (no float32 copy of
    every layer's) and computes the head in bf16, as the model's own head would."""
    tok = char_tokenizer()
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(4), bf16=True)
    seen = []
    apply = ops.LinearLogprobs.apply
    monkeypatch.setattr(ops.LinearLogprobs, "apply", lambda *a: seen.append(a[0].dtype) or apply(*a))
    _moved(trainer.model)
    batch = batch_of(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    assert seen == [torch.bfloat16]
    with trainer.accelerator.autocast():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = reference.sequence_logprobs_from_logits(logits[:, :-1].float(), batch["labels"][:, 1:]).view(4, 4)
    want = reference.nca_loss(logps, batch["ref_logps"], batch["rewards"], beta=0.5, alpha=0.3)
    torch.testing.assert_close(loss, want.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("loss_type", ["dpo", "nca_pair"])
def test_pairwise_losses_need_two_responses(tmp_path, loss_type):
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}' needs K=2 responses per prompt, the train "
                                         "dataset has K=4"):
        make_trainer(tmp_path, tiny_llama(len(char_tokenizer())), reward_rows(2), loss_type=loss_type)


def test_unusable_settings_refused_before_the_reference_pass(tmp_path):
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="backend='cuda' cannot run on the training device cpu"):
        make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(2), backend="cuda")
    with pytest.raises(ValueError, match="compute_metrics is not supported"):
        NCATrainer(tiny_llama(len(tok)), NCAConfig(**_settings(tmp_path)),
                   train_dataset=Dataset.from_list(reward_rows(2)), processing_class=tok, compute_metrics=lambda p: {})


def test_training_logs_metrics_and_evaluates(tmp_path):
    tok = char_tokenizer()
    rows = reward_rows(8)
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), rows, max_steps=4, logging_steps=2)
    trainer.eval_dataset = trainer.train_dataset
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in ("rewards/rank0", "rewards/rank3", "rewards/accuracy", "rewards/margin", "logps/policy",
                "logps/chosen"):
        assert all(key in h and torch.isfinite(torch.tensor(h[key])) for h in logs), key
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/accuracy", "eval_logps/chosen"} <= set(metrics)
    # The policy moved: the top-reward responses now get a higher model reward than the rest.
    assert metrics["eval_rewards/margin"] > 0


def test_bf16_reference_matches_the_training_forward(tmp_path):
    """Under bf16 autocast the first step still sees policy == reference: every model reward is 0."""
    tok = char_tokenizer()
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(4), max_steps=1, logging_steps=1, bf16=True,
                           per_device_eval_batch_size=2)
    trainer.train()
    first = trainer.state.log_history[0]
    assert [first[f"rewards/rank{i}"] for i in range(4)] == [0.0] * 4


def test_resume_continues_where_it_stopped(tmp_path):
    tok = char_tokenizer()
    rows = reward_rows(8)
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "lr_scheduler_type": "constant",
                "seed": 3, "logging_steps": 1}
    full = make_trainer(tmp_path / "a", tiny_llama(len(tok)), rows, **settings)
    full.train()
    resumed = make_trainer(tmp_path / "b", tiny_llama(len(tok)), rows, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    # The history up to the checkpoint is restored, then steps 3 and 4 run.
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    tok = char_tokenizer()
    rows = reward_rows(8)
    runs = []
    for batch, accumulate in ((4, 1), (2, 2)):
        trainer = make_trainer(tmp_path / f"b{batch}", tiny_llama(len(tok)), rows, max_steps=2,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                               lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0)
        trainer.train()
        runs.append(trainer.model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_peft_reference_disables_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    tok = char_tokenizer()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(len(tok)), lora)
    trainer = make_trainer(tmp_path, model, reward_rows(3), max_steps=2)
    batch = batch_of(trainer, 3)
    with torch.no_grad():
        adapted = naive_logps(model, batch).view(3, 4)
        with model.disable_adapter():
            base = naive_logps(model, batch).view(3, 4)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_logps"]), base, rtol=1e-5, atol=1e-5)
    trainer.train()
    assert trainer.state.global_step == 2


def test_eval_metric_values(tmp_path):
    tok = char_tokenizer()
    trainer = NCATrainer(tiny_llama(len(tok)), NCAConfig(**_settings(tmp_path)),
                         train_dataset=Dataset.from_list(reward_rows(2)),
                         eval_dataset=Dataset.from_list(reward_rows(5, seed=4)),
                         processing_class=tok)
    _moved(trainer.model)
    m = trainer.evaluate()  # batches of 3 and 2
    data = trainer.eval_dataset
    batch = trainer.data_collator([data[i] for i in range(5)])
    with torch.no_grad():
        logps = naive_logps(trainer.model, batch).view(5, 4)
    mr = 0.5 * (logps - batch["ref_logps"])
    order = batch["rewards"].argsort(-1, descending=True)
    ranked = mr.gather(-1, order)
    for i in range(4):
        assert m[f"eval_rewards/rank{i}"] == pytest.approx(ranked[:, i].mean().item(), rel=1e-4, abs=1e-6)
    assert m["eval_logps/chosen"] == pytest.approx(logps.gather(-1, order[:, :1]).mean().item(), rel=1e-5)
    top = order[:, :1]
    others = (mr.sum(-1) - mr.gather(-1, top).squeeze(-1)) / 3
    assert m["eval_rewards/margin"] == pytest.approx((mr.gather(-1, top).squeeze(-1) - others).mean().item(), rel=1e-4)
    best_other = mr.scatter(-1, top, float("-inf")).amax(-1)
    accuracy = (mr.gather(-1, top).squeeze(-1) > best_other).float().mean().item()
    assert m["eval_rewards/accuracy"] == pytest.approx(accuracy)
    assert m["eval_logps/policy"] == pytest.approx(logps.mean().item(), rel=1e-5)


def test_average_reaches_reference_and_loss(tmp_path):
    tok = char_tokenizer()
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(4), average=True)
    batch = batch_of(trainer)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = reference.sequence_logprobs_from_logits(logits[:, :-1], batch["labels"][:, 1:], average=True).view(4, 4)
    torch.testing.assert_close(batch["ref_logps"], want, rtol=1e-5, atol=1e-5)
    _moved(trainer.model)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = reference.sequence_logprobs_from_logits(logits[:, :-1], batch["labels"][:, 1:], average=True).view(4, 4)
    want = reference.nca_loss(lp, batch["ref_logps"], batch["rewards"], beta=0.5, alpha=0.3)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_train_logs_are_per_interval_and_eval_logs_clean(tmp_path):
    tok = char_tokenizer()
    trainer = NCATrainer(tiny_llama(len(tok)), NCAConfig(**_settings(tmp_path, max_steps=4, logging_steps=2,
                                                                   eval_strategy="steps", eval_steps=1)),
                         train_dataset=Dataset.from_list(reward_rows(8)),
                         eval_dataset=Dataset.from_list(reward_rows(3, seed=1)), processing_class=tok)
    seen = []
    record = trainer._record
    trainer._record = lambda metrics, rewards, mode: (seen.append((mode, metrics["policy_logps"].mean().item()))
                                                       or record(metrics, rewards, mode))
    trainer.train()
    train_means = [v for mode, v in seen if mode == "train"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    pairs = [(a + b) / 2 for a, b in zip(train_means[::2], train_means[1::2])]
    assert len(logs) == 2 and [h["logps/policy"] for h in logs] == pytest.approx(pairs, rel=1e-5)
    assert not any("rewards/accuracy" in h for h in trainer.state.log_history if "eval_loss" in h)


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    tok = char_tokenizer()
    tok.pad_token = None
    trainer = NCATrainer(tiny_llama(len(tok)), NCAConfig(**_settings(tmp_path)),
                         train_dataset=Dataset.from_list(reward_rows(2)), processing_class=tok)
    assert trainer.data_collator.pad_token_id == tok.eos_token_id


def test_peft_raw_eval_after_training(tmp_path):
    peft = pytest.importorskip("peft")
    tok = char_tokenizer()
    model = peft.get_peft_model(tiny_llama(len(tok)), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = make_trainer(tmp_path, model, reward_rows(3), max_steps=1)
    trainer.train()
    assert "eval_loss" in trainer.evaluate(Dataset.from_list(reward_rows(3, seed=1)))


def test_reference_pass_in_eval_mode(tmp_path):
    tok = char_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.5))
    model.train()
    trainer = make_trainer(tmp_path, model, reward_rows(3))
    assert model.training
    model.eval()
    with torch.no_grad():
        want = naive_logps(model, batch_of(trainer, 3)).view(3, 4)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_logps"]), want, rtol=1e-5, atol=1e-5)


def test_predict_pairwise_uses_alpha_zero(tmp_path):
    tok = char_tokenizer()
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(4, k=2))
    _moved(trainer.model)
    pairs = Dataset.from_list([{**r, "ref_logps": [-3.0, -3.5]} for r in PAIRS])
    out = trainer.predict(pairs)
    prepared = trainer._prepare(pairs, "x")
    expected = _naive_loss(trainer, trainer._prepared[id(prepared)][1], 0.0)
    assert out.metrics["test_loss"] == pytest.approx(expected, rel=1e-5)


def test_constructor_checks_its_arguments(tmp_path):
    """args must be an NCAConfig; a tokenizer is required, with a pad or EOS id to pad with; a
    data_collator given is the one used (from the reference pass on)."""
    tok = char_tokenizer()
    data = Dataset.from_list(reward_rows(2))
    with pytest.raises(TypeError, match="args must be an NCAConfig, got TrainingArguments"):
        NCATrainer(tiny_llama(len(tok)), TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                   train_dataset=data, processing_class=tok)
    config = NCAConfig(**_settings(tmp_path))
    with pytest.raises(ValueError, match=r"processing_class \(the tokenizer\) is required"):
        NCATrainer(tiny_llama(len(tok)), config, train_dataset=data)
    calls = []

    def collate(features):
        calls.append(len(features))
        return NCACollator(tok.pad_token_id)(features)

    trainer = NCATrainer(tiny_llama(len(tok)), config, train_dataset=data, processing_class=tok, data_collator=collate)
    assert trainer.data_collator is collate and calls == [2]
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad_token_id nor an eos_token_id"):
        NCATrainer(tiny_llama(len(tok)), config, train_dataset=data, processing_class=tok)


def test_raw_evaluation_sets_after_training(tmp_path):
    """After training, a raw evaluation set keeps the reference log-probs it got before (the same
    dataset object is not prepared again), and with an explicit ref_model a new raw set is scored by
    that model, which training did not move."""
    tok = char_tokenizer()
    raw = Dataset.from_list(reward_rows(3, seed=1))
    one_step = {"max_steps": 1, "lr_scheduler_type": "constant", "warmup_steps": 0}
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(4), **one_step)
    before = trainer.evaluate(raw)
    trainer.train()
    after = trainer.evaluate(raw)
    assert before["eval_rewards/margin"] == 0.0 and after["eval_rewards/margin"] != 0.0
    trainer = make_trainer(tmp_path, tiny_llama(len(tok)), reward_rows(4), ref_model=tiny_llama(len(tok)), **one_step)
    trainer.train()
    assert after["eval_loss"] == pytest.approx(trainer.evaluate(raw)["eval_loss"], rel=1e-5)


def test_backend_setting_reaches_the_reference_pass(tmp_path, monkeypatch):
    """The configured backend computes the reference log-probs too, not only the training loss."""
    seen = []
    logprobs = reference_pass.sequence_logprobs
    monkeypatch.setattr(reference_pass, "sequence_logprobs",
                        lambda *args, **kwargs: seen.append(kwargs["backend"]) or logprobs(*args, **kwargs))
    make_trainer(tmp_path, tiny_llama(len(char_tokenizer())), reward_rows(5), backend="torch")
    assert seen == ["torch", "torch"]  # 5 prompts in evaluation batches of 3


def test_add_reference_logps_replaces_a_column_in_the_data(tmp_path):
    """Given a dataset that already has ref_logps, add_reference_logps replaces them with the model's."""
    trainer = make_trainer(tmp_path, tiny_llama(len(char_tokenizer())), reward_rows(3))
    data = trainer.train_dataset
    stale = data.remove_columns("ref_logps").add_column("ref_logps", [[0.0] * 4] * 3)
    fresh = add_reference_logps(stale, trainer.model, trainer.data_collator, batch_size=2)
    assert fresh.column_names.count("ref_logps") == 1
    torch.testing.assert_close(torch.tensor(fresh["ref_logps"]), torch.tensor(data["ref_logps"]), rtol=1e-6, atol=1e-6)
