"""NCATrainer: ``transformers.Trainer`` with the fused InfoNCA/NCA loss on the LM head."""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from transformers import Trainer

from ..api import fused_nca_loss
from ..losses import preference_metrics
from .config import NCAConfig
from .data import NCACollator, prepare_dataset
from .modeling import check_head_output, check_lm_head, head_operands, last_hidden
from .reference import add_reference_logps


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


class NCATrainer(Trainer):
    """Aligns a causal LM with InfoNCA/NCA/DPO on reward or preference data.

    ``train_dataset`` / ``eval_dataset``: any layout of :mod:`nca_kernels.trainer.data` (raw or
    already tokenised). ``processing_class``: the tokenizer. Reference log-probs are computed once
    here, before training, with ``ref_model`` or else the initial policy (with its PEFT adapters
    disabled for a PEFT model), unless the dataset already has a ``ref_logps`` column.
    Logs, per logging interval: ``rewards/rank{i}`` (mean model reward of the i-th best response
    by the dataset's reward), ``rewards/accuracy``, ``rewards/margin``, ``logps/policy`` (mean over
    all responses) and ``logps/chosen`` (the top-reward response).
    """

    def __init__(self, model, args: NCAConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 ref_model=None, **kwargs):
        if not isinstance(args, NCAConfig):
            raise TypeError(f"args must be an NCAConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required to tokenise the dataset")
        check_lm_head(model)  # before the reference pass: a head the fused loss cannot read fails now
        args.check_backend_device()
        if kwargs.get("compute_metrics") is not None:
            raise ValueError("compute_metrics is not supported: evaluation computes the loss and logs the reward "
                             "metrics (rewards/accuracy, ...), with no predictions to pass to it")
        pad_id = processing_class.pad_token_id
        if pad_id is None:
            pad_id = processing_class.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id to pad with")
        collator = kwargs.pop("data_collator", None) or NCACollator(pad_id)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if args.fsdp and not self.is_fsdp_enabled:  # accelerate shards on accelerators only: CPU processes get DDP
            warnings.warn(f"fsdp is set but accelerate does not shard on {self.args.device.type}: every process "
                          "holds the whole model (DDP), with the same loss and update as unsharded training",
                          stacklevel=2)
        # compute_loss returns a per-batch mean: Trainer divides it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": defaultdict(lambda: [0.0, 0]), "eval": defaultdict(lambda: [0.0, 0])}  # sum, count
        self._head_checked = False
        if ref_model is not None:
            ref_model = ref_model.to(self.args.device)
        self._reference = ref_model if ref_model is not None else self.model
        self._prepared = {}  # id(given dataset) -> (given, prepared, alpha)
        self.train_dataset = self._prepare(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {name: self._prepare(data, f"eval {name!r}") for name, data in eval_dataset.items()}
        else:
            self.eval_dataset = self._prepare(eval_dataset, "eval")
        self.alpha = self._alpha(self.train_dataset)  # pairwise data means alpha=0, per dataset
        self._eval_alpha = args.alpha

    def _prepare(self, data, name: str, late: bool = False):
        """``data`` tokenised (any layout of :mod:`.data`) and with its reference log-probs, once per
        dataset object; None stays None. ``late``: given after the constructor, when the policy may
        have moved away from the reference it stood in for (a PEFT model's base does not move)."""
        if data is None or id(data) in self._prepared:
            return None if data is None else self._prepared[id(data)][1]
        args = self.args
        prepared, fmt = prepare_dataset(data, self.processing_class, args.max_length, args.max_prompt_length, args.K)
        moved = self._reference is self.model and not _is_peft(self.model) and self.state.global_step > 0
        if late and moved and "ref_logps" not in prepared.column_names:
            raise ValueError(f"the {name} dataset has no ref_logps column, and after training its reference "
                             "log-probs would come from the trained policy: pass it to NCATrainer (eval_dataset "
                             "takes a dict of named sets), add a ref_logps column, or give a ref_model")
        k = len(prepared[0]["response_ids"])
        if args.loss_type in ("dpo", "nca_pair") and k != 2:
            raise ValueError(f"loss_type={args.loss_type!r} needs K=2 responses per prompt, the {name} dataset has "
                             f"K={k}")
        if "ref_logps" not in prepared.column_names:
            reference = self._reference
            prepared = add_reference_logps(
                prepared, reference, self.data_collator, batch_size=args.per_device_eval_batch_size,
                average=args.average, backend=args.backend, accelerator=self.accelerator,
                disable_adapters=reference is self.model and _is_peft(reference),
                forward_context=self.accelerator.autocast)
        alpha = 0.0 if fmt == "pairwise" else args.alpha
        self._prepared[id(data)] = self._prepared[id(prepared)] = (data, prepared, alpha)
        return prepared

    def _alpha(self, prepared) -> float:
        return self.args.alpha if prepared is None else self._prepared[id(prepared)][2]

    def _evaluated(self, data):
        """A dataset about to be evaluated or predicted on, prepared; its alpha is the loss's."""
        data = self._prepare(data, "evaluation", late=True)
        self._eval_alpha = self._alpha(data)
        return data

    def get_eval_dataloader(self, eval_dataset=None):
        if isinstance(eval_dataset, str):  # a named set, prepared in the constructor; its name keys its loader
            self._evaluated(self.eval_dataset[eval_dataset])
            return super().get_eval_dataloader(eval_dataset)
        return super().get_eval_dataloader(self._evaluated(self.eval_dataset if eval_dataset is None else eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return super().get_test_dataloader(self._evaluated(test_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Backbone to last hidden states, then the fused loss on the LM-head weight (labels shifted)."""
        unwrapped = self.accelerator.unwrap_model(model)
        hidden, last_logits = last_hidden(model, unwrapped, inputs)
        hidden, weight, bias, softcap = head_operands(unwrapped, hidden)
        if not self._head_checked:  # once: the model's own logits agree with the head the loss reads
            check_head_output(unwrapped, hidden, last_logits, weight, bias, softcap)
            self._head_checked = True
        with self.accelerator.autocast():  # mixed precision: the head in its dtype, as the model's own would be
            loss, metrics = fused_nca_loss(
                hidden, weight, inputs["labels"], inputs["rewards"], inputs["ref_logps"], beta=self.args.beta,
                alpha=self.alpha if model.training else self._eval_alpha, loss_type=self.args.loss_type, bias=bias,
                average=self.args.average, shift=True, softcap=softcap, recompute=self.args.recompute,
                backend=self.args.backend, return_metrics=True,
            )
        self._record(metrics, inputs["rewards"], "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def _record(self, metrics: dict, rewards: torch.Tensor, mode: str) -> None:
        """Per-prompt metrics of a batch, gathered from every process (in evaluation without the
        padding rows of an uneven last batch), summed with their count."""
        per = preference_metrics(metrics["policy_logps"], metrics["model_rewards"], rewards, per_prompt=True)
        ranked = per["model_rewards"].gather(-1, rewards.argsort(dim=-1, descending=True))
        values = {f"rewards/rank{i}": ranked[:, i] for i in range(ranked.shape[1])}
        values.update({"rewards/accuracy": per["accuracy"], "rewards/margin": per["margin"],
                       "logps/policy": per["policy_logps"].mean(-1), "logps/chosen": per["chosen_logps"]})
        stacked = torch.stack([v.float() for v in values.values()], dim=1)
        gather = self.accelerator.gather_for_metrics if mode == "eval" else self.accelerator.gather
        stacked = gather(stacked)
        for name, total in zip(values, stacked.sum(0).tolist()):
            self._metrics[mode][name][0] += total
            self._metrics[mode][name][1] += stacked.shape[0]

    @staticmethod
    def _means(recorded: dict) -> dict:
        return {name: total / count for name, (total, count) in recorded.items()}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the loss (and records the metrics) only."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Adds the means of the metrics recorded over the loop (``{prefix}_rewards/accuracy``, ...)."""
        self._metrics["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._means(self._metrics["eval"]).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        self._metrics["eval"].clear()
        return output

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the means of the training metrics recorded since the last training log."""
        if "loss" in logs:
            logs.update(self._means(self._metrics["train"]))
            self._metrics["train"].clear()
        super().log(logs, *args, **kwargs)
