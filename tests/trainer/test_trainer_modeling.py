"""The LM head the fused loss reads: its operands reproduce the model's logits, and a head they
cannot reproduce is refused with the reason, never trained on a wrong loss."""

from __future__ import annotations

import pytest
import torch

from nca_kernels import reference
from nca_kernels.trainer import modeling
from nca_kernels.trainer.modeling import attn_implementation, head_operands

from .common import HEADS, char_tokenizer, reward_rows, tiny_granite, tiny_llama, tiny_phi
from .test_trainer_loss import batch_of, make_trainer


def logits_of(model, hidden):
    """What the fused loss takes for the model's logits of ``hidden`` ``(N, H)``."""
    hidden, weight, bias, softcap = head_operands(model, hidden)
    return reference.cap(hidden @ weight.T + (0 if bias is None else bias), softcap)


def scale_head(model, factor: float):
    """``model`` with its LM head replaced by one that multiplies its output by ``factor`` (same parameters)."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return factor * super().forward(x)

    old = model.lm_head
    head = Scaled(old.in_features, old.out_features, bias=old.bias is not None)
    head.weight, head.bias = old.weight, old.bias
    model.lm_head = head
    return model


@pytest.mark.parametrize("head", HEADS)
def test_operands_give_the_models_logits(head):
    """Tied and untied heads, a bias, Granite's and MiniCPM3's ``logits_scaling`` (divided),
    HyperCLOVA X's (multiplied), Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, Gemma
    2's ``final_logit_softcapping`` and RecurrentGemma's ``logits_soft_cap``."""
    model = HEADS[head](len(char_tokenizer()))
    ids = torch.randint(3, 40, (2, 7))
    out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(logits_of(model, out.hidden_states[-1]), out.logits, rtol=1e-5, atol=1e-5)
    hidden, weight, _, softcap = head_operands(model, out.hidden_states[-1].bfloat16())
    assert hidden.dtype == weight.dtype == torch.bfloat16
    assert (softcap is not None) == head.endswith("capped")


@pytest.mark.parametrize("factor", [2.0, 1.01])
def test_logits_transformed_after_the_head_are_refused(tmp_path, factor):
    """A head whose output is not ``x @ W.T + b`` (here: scaled, by as little as 1% in float32),
    which no config names: the check of the model's own last-position logits on the first batch
    refuses it."""
    model = scale_head(tiny_phi(len(char_tokenizer())), factor)
    with pytest.raises(ValueError, match="logits are not its last hidden state times the LM-head weight"):
        make_trainer(tmp_path, model, reward_rows(2))


def test_head_is_checked_in_training_without_a_reference_pass(tmp_path):
    """Reference log-probs in the data skip the reference pass and its check of the head: the first
    training loss checks the model's logits instead, and refuses a head transformed after it."""
    rows = [{**r, "ref_logps": [-1.0, -2.0]} for r in reward_rows(2, k=2)]
    trainer = make_trainer(tmp_path, scale_head(tiny_phi(len(char_tokenizer())), 1.5), rows)
    with pytest.raises(ValueError, match="logits are not its last hidden state times the LM-head weight"):
        trainer.compute_loss(trainer.model, batch_of(trainer, 2))


def test_heads_that_are_not_the_last_hidden_state_times_the_weight_are_refused(tmp_path):
    """A head fed from a narrower projection (ELECTRA), logits sliced to an unpadded vocabulary
    (Inkling 2), a prediction head in front of the output Linear that the model names its decoder
    (ModernBERT): each is refused with the reason, never a shape error or a wrong loss."""
    from transformers import (
        ElectraConfig,
        ElectraForCausalLM,
        Inkling2ForCausalLM,
        Inkling2TextConfig,
        ModernBertDecoderConfig,
        ModernBertDecoderForCausalLM,
    )

    v = len(char_tokenizer())
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    cases = [
        (ElectraForCausalLM(ElectraConfig(vocab_size=v, is_decoder=True, **sizes)),
         rf"weight \({v}, 128\) does not map"),
        (Inkling2ForCausalLM(Inkling2TextConfig(vocab_size=v + 5, unpadded_vocab_size=v, num_key_value_heads=4,
                                                head_dim=8, **sizes)), rf"weight \({v + 5}, 32\) does not map"),
        (ModernBertDecoderForCausalLM(ModernBertDecoderConfig(vocab_size=v, pad_token_id=0, bos_token_id=1,
                                                              eos_token_id=2, **sizes)),
         "logits are not its last hidden state times the LM-head weight"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            make_trainer(tmp_path, model, reward_rows(2))


def test_zero3_placeholder_is_refused():
    model = tiny_phi(40)
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = (40, 32)  # how DeepSpeed ZeRO-3 leaves a partitioned parameter
    model.lm_head.weight = placeholder
    with pytest.raises(ValueError, match="sharded"):
        head_operands(model, torch.randn(2, 32))


def test_flattened_head_weight_is_refused():
    """FSDP1 leaves a 1-D flattened view of a sharded weight: refused as sharded, never read as the head."""
    model = tiny_phi(40)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().flatten())
    with pytest.raises(ValueError, match="sharded"):
        head_operands(model, torch.randn(2, 32))


def test_a_forward_without_logits_to_keep_is_refused(tmp_path, monkeypatch):
    """A model whose forward cannot limit its logits to the last position would build the full logits: refused."""
    model = tiny_llama(len(char_tokenizer()))
    forward = type(model).forward

    def full_logits(self, input_ids=None, attention_mask=None, use_cache=None, output_hidden_states=None):
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                       output_hidden_states=output_hidden_states)

    monkeypatch.setattr(type(model), "forward", full_logits)
    with pytest.raises(ValueError, match="LlamaForCausalLM.forward has no logits_to_keep"):
        make_trainer(tmp_path, model, reward_rows(2))


@pytest.mark.parametrize("gpu, flash, want", [(True, True, "flash_attention_2"), (True, False, "sdpa"),
                                               (False, True, "sdpa"), (False, False, "sdpa")])
def test_flash_attention_needs_both_the_package_and_a_gpu(monkeypatch, gpu, flash, want):
    """flash_attention_2 only with flash-attn installed and a GPU present; sdpa otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: object() if flash else None)
    assert attn_implementation() == want


def test_dtensor_shard_is_refused(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_phi(40)
        mesh = init_device_mesh("cpu", (1,))
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="sharded"):
            head_operands(model, torch.randn(2, 32))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def test_lora_on_the_head_is_refused_unless_merged(peft, tmp_path):
    """LoRA on lm_head changes the head's output but not its weight: the fused loss would silently
    miss it. Refused while active; a merged adapter lives in the weight and is read as such."""
    model = peft.get_peft_model(tiny_phi(len(char_tokenizer())),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    with pytest.raises(ValueError, match="PEFT adapters"):
        make_trainer(tmp_path, model, reward_rows(2))
    head = model.get_base_model().get_output_embeddings()
    x = torch.randn(5, 32)
    with model.disable_adapter():  # the reference pass's view: the base head
        torch.testing.assert_close(logits_of(model, x), head(x))
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, x), head(x))


def test_modules_to_save_head_is_read(peft):
    """``modules_to_save=["lm_head"]`` trains a copy of the head: that copy is what the loss reads."""
    model = peft.get_peft_model(tiny_phi(len(char_tokenizer())),
                                peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.get_base_model().get_output_embeddings()
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # the trained copy moves away from the original
    x = torch.randn(5, 32)
    assert head_operands(model, x)[1].requires_grad
    torch.testing.assert_close(logits_of(model, x), head(x))


def test_bias_and_logit_scaling_together():
    model = tiny_granite(len(char_tokenizer()))
    head = torch.nn.Linear(32, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    out = model(input_ids=torch.randint(3, 40, (2, 7)), output_hidden_states=True)
    torch.testing.assert_close(logits_of(model, out.hidden_states[-1]), out.logits, rtol=1e-5, atol=1e-5)


def test_slightly_scaled_head_is_refused(tmp_path):
    model = scale_head(tiny_llama(len(char_tokenizer())), 1.2)
    with pytest.raises(ValueError, match="logits are not its last hidden state"):
        make_trainer(tmp_path, model, reward_rows(2))
