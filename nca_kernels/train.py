"""``nca-train``: align a local causal LM on a reward dataset, or run the embedded demo.

    nca-train --model_name_or_path MODEL_DIR --dataset data.jsonl --output_dir OUT [TrainingArguments...]
    nca-train --demo --output_dir DIR [--compare]

Every :class:`~nca_kernels.trainer.NCAConfig` field (and so every ``TrainingArguments`` field) is
a flag. Runs data-parallel under ``torchrun`` and ``accelerate launch``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field


@dataclass
class ScriptArguments:
    """What to train on; the training settings are in NCAConfig."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A local Hugging Face model directory with its tokenizer (never downloaded)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local model directory for the reference log-probs (default: the initial policy)."},
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Training data: a .json/.jsonl/.parquet file or a saved dataset directory."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Optional evaluation data, same formats."})
    dtype: str = field(
        default="float32",
        metadata={"help": "The weights' dtype: float32 (with --bf16 or --fp16 for mixed precision), bfloat16, "
                          "float16, or auto (the checkpoint's).",
                  "choices": ["float32", "bfloat16", "float16", "auto"]},
    )
    demo: bool = field(
        default=False,
        metadata={"help": "Run the embedded CPU demo instead (no model or data needed; it uses its own loss and "
                          "optimiser settings)."},
    )
    compare: bool = field(default=False, metadata={"help": "With --demo: also run InfoNCA from the same start."})


def build_trainer(script: ScriptArguments, config):
    """NCATrainer for a local model directory and reward dataset (the backend and the data are checked
    first, so a bad setting or path fails before the model loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .trainer import NCATrainer, attn_implementation, load_reward_dataset

    config.check_backend_device()
    for flag, path in (("--model_name_or_path", script.model_name_or_path),
                       ("--ref_model_name_or_path", script.ref_model_name_or_path)):
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is not a local model directory")
    train_data = load_reward_dataset(script.dataset)
    eval_data = load_reward_dataset(script.eval_dataset) if script.eval_dataset else None
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path, local_files_only=True)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=script.dtype,
                                                    attn_implementation=attn_implementation())

    ref_model = load(script.ref_model_name_or_path) if script.ref_model_name_or_path else None
    return NCATrainer(load(script.model_name_or_path), config, train_dataset=train_data, eval_dataset=eval_data,
                      processing_class=tokenizer, ref_model=ref_model)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``nca-train``): trains, then saves to ``--output_dir``."""
    from transformers import HfArgumentParser

    from .trainer import NCAConfig
    from .trainer.demo import DemoArguments, run_demo

    parser = HfArgumentParser((ScriptArguments, DemoArguments, NCAConfig))
    try:  # bad settings and data end as a usage error; errors while training keep their traceback
        script, demo_args, config = parser.parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
        if script.compare and not script.demo:
            parser.error("--compare needs --demo")
        if not script.demo and (script.model_name_or_path is None or script.dataset is None):
            parser.error("--model_name_or_path and --dataset are required (or --demo)")
        trainer = None if script.demo else build_trainer(script, config)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if trainer is None:
        run_demo(config, demo_args, compare=script.compare)
    else:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        trainer.save_model()


if __name__ == "__main__":
    main()
