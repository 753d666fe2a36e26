"""Training arguments: :class:`transformers.TrainingArguments` plus the NCA fields.

Defaults follow the paper's released reward-data recipe (Mistral-7B on UltraFeedback, K=4):
``beta=0.01``, ``alpha=1e-4``, learning rate ``5e-6`` with a cosine schedule and 10% warmup,
``max_length=1024``, ``max_prompt_length=512``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .. import validation
from ..backends import unavailable_reason
from .data import check_lengths


@dataclass
class NCAConfig(TrainingArguments):
    """``TrainingArguments`` with the loss and data fields of InfoNCA/NCA training.

    ``per_device_train_batch_size`` counts prompts: every prompt brings its K responses.
    """

    beta: float = field(default=0.01, metadata={"help": "Scale of the model reward beta * (log pi - log pi_ref)."})
    alpha: float = field(
        default=1e-4,
        metadata={"help": "Temperature of the soft labels softmax(rewards / alpha); 0 means the top-reward "
                          "response(s) only. Pairwise (chosen/rejected) data always uses 0."},
    )
    loss_type: str = field(default="nca", metadata={"help": "One of nca, infonca, dpo, nca_pair."})
    K: int | None = field(
        default=None,
        metadata={"help": "Responses per prompt; None takes it from the dataset, a number is checked against it."},
    )
    average: bool = field(default=False, metadata={"help": "Use length-averaged log-probs instead of sums."})
    backend: str = field(default="auto", metadata={"help": "Kernel backend: auto, torch, triton or cuda."})
    recompute: bool = field(
        default=True,
        metadata={"help": "True: minimal memory, logits recomputed in backward. False: chunks of whole prompt "
                          "groups, every gradient formed in the forward (faster, one chunk of logits held)."},
    )
    max_length: int = field(default=1024, metadata={"help": "Longest prompt + response in tokens."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts are cut to their last max_prompt_length tokens when a row is too long."}
    )
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate (paper: 5e-6)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup steps; a float in [0, 1) is a fraction of training (paper: 0.1)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Always False: the collator needs the tokenised columns."}
    )

    def __post_init__(self):
        validation.check_loss_params(self.beta, self.alpha, self.loss_type)
        validation.check_backend(self.backend)
        if self.K is not None and self.K < 2:
            raise ValueError(f"K must be at least 2 responses per prompt, got {self.K}")
        check_lengths(self.max_length, self.max_prompt_length)
        if self.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor={self.label_smoothing_factor}: the NCA losses take no label "
                             "smoothing (their soft labels come from the rewards and alpha)")
        self.remove_unused_columns = False
        super().__post_init__()

    def check_backend_device(self) -> None:
        """A ValueError unless ``backend`` can run on the training device (``"auto"`` always can)."""
        reason = None if self.backend == "auto" else unavailable_reason(self.backend, self.device)
        if reason is not None:
            raise ValueError(f"backend={self.backend!r} cannot run on the training device {self.device}: {reason}")
