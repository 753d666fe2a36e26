"""The LM head the fused loss reads: refused, with the reason, where it would give a wrong loss."""

from __future__ import annotations

import pytest
import torch

from nca_kernels.trainer.modeling import lm_head

from .common import char_tokenizer, tiny_llama, tiny_phi


def test_whole_head_is_returned():
    model = tiny_phi(40)
    weight, bias = lm_head(model, torch.bfloat16)
    assert weight.shape == (40, 32) and bias.shape == (40,) and weight.dtype == bias.dtype == torch.bfloat16
    torch.testing.assert_close(weight, model.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("setting", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625)])
def test_rescaled_logits_are_refused(setting):
    model = tiny_llama(40)
    setattr(model.config, *setting)
    with pytest.raises(ValueError, match="rescales its logits"):
        lm_head(model, torch.float32)


def test_zero3_placeholder_is_refused():
    model = tiny_phi(40)
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = (40, 32)  # how DeepSpeed ZeRO-3 leaves a partitioned parameter
    model.lm_head.weight = placeholder
    with pytest.raises(ValueError, match="sharded"):
        lm_head(model, torch.float32)


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
            lm_head(model, torch.float32)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def test_lora_on_the_head_is_refused_unless_merged(peft, tmp_path):
    """LoRA on lm_head changes the head's output but not its weight: the fused loss would silently
    miss it. Refused while active; a merged adapter lives in the weight and is read as such."""
    from .common import reward_rows
    from .test_trainer_loss import make_trainer

    model = peft.get_peft_model(tiny_phi(len(char_tokenizer())),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    with pytest.raises(ValueError, match="PEFT adapters"):
        make_trainer(tmp_path, model, reward_rows(2))
    head = model.get_base_model().get_output_embeddings()
    x = torch.randn(5, 32)
    with model.disable_adapter():  # the reference pass's view: the base head
        weight, bias = lm_head(model, torch.float32)
        torch.testing.assert_close(x @ weight.T + bias, head(x))
    model.merge_adapter()
    weight, bias = lm_head(model, torch.float32)
    torch.testing.assert_close(x @ weight.T + bias, head(x))


def test_modules_to_save_head_is_read(peft):
    """``modules_to_save=["lm_head"]`` trains a copy of the head: that copy is what the loss reads."""
    model = peft.get_peft_model(tiny_phi(len(char_tokenizer())),
                                peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.get_base_model().get_output_embeddings()
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # the trained copy moves away from the original
    weight, bias = lm_head(model, torch.float32)
    x = torch.randn(5, 32)
    assert weight.requires_grad
    torch.testing.assert_close(x @ weight.T + bias, head(x))


@pytest.mark.parametrize("scaling", [1.0, 8.0])
def test_logits_transformed_after_the_head_are_refused(tmp_path, scaling):
    """Granite divides its logits by ``logits_scaling`` after the LM head, which the fused loss
    cannot see in the weight: the check of the model's own last-position logits refuses it (at 8),
    and lets the same model through when the scaling is 1."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from .common import reward_rows
    from .test_trainer_loss import make_trainer

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                        logits_scaling=scaling, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = GraniteForCausalLM(cfg)
    if scaling == 1.0:
        make_trainer(tmp_path, model, reward_rows(2))
    else:
        with pytest.raises(ValueError, match="logits are not its last hidden state times the LM-head weight"):
            make_trainer(tmp_path, model, reward_rows(2))
