"""The nca-train CLI: a local model directory and a data file, one process or two (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from nca_kernels.train import ScriptArguments, build_trainer, main
from nca_kernels.trainer import NCAConfig

from .common import char_tokenizer, one_thread, reward_rows, tiny_llama  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A tiny model directory with its tokenizer, and a reward dataset in the UltraFeedback layout."""
    root = tmp_path_factory.mktemp("cli")
    tok = char_tokenizer()
    tiny_llama(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"prompt": r["prompt"], **{f"A{i}": x for i, x in enumerate(r["responses"])},
             **{f"score_A{i}": x for i, x in enumerate(r["rewards"])}} for r in reward_rows(16)]
    Dataset.from_list(rows).to_parquet(root / "data.parquet")
    Dataset.from_list(rows[:7]).to_parquet(root / "eval.parquet")  # 7 prompts: uneven batches over 2 processes
    return str(root / "model"), str(root / "data.parquet")


def cli_args(model, data, out, batch):
    return ["--model_name_or_path", model, "--dataset", data, "--output_dir", out, "--per_device_train_batch_size",
            str(batch), "--max_steps", "3", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--warmup_steps", "0", "--beta", "0.5", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", "--max_length", "64", "--max_prompt_length", "32"]


@pytest.mark.parametrize("args,message", [
    ([], "--model_name_or_path and --dataset are required"),
    (["--compare"], "--compare needs --demo"),
    (["--model_name_or_path", "missing", "--dataset", "x.jsonl"], "'missing' is not a local model directory"),
    (["--model_name_or_path", ROOT, "--ref_model_name_or_path", "missing", "--dataset", "x.jsonl"],
     "--ref_model_name_or_path 'missing' is not a local model directory"),
    (["--loss_type", "ipo"], "loss_type must be one of"),
    (["--label_smoothing_factor", "0.1"], "label_smoothing_factor=0.1: the NCA losses take no label smoothing"),
    (["--model_name_or_path", "m", "--dataset", "x.jsonl", "--backend", "cuda", "--use_cpu"],
     "backend='cuda' cannot run on the training device cpu"),
])
def test_cli_usage_errors(tmp_path, capsys, args, message):
    """Bad settings end as a usage error (exit status 2) that says what is wrong, not a traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(["--output_dir", str(tmp_path), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_reference_model(model_and_data, tmp_path):
    """--ref_model_name_or_path: the reference log-probs are that model's, not the policy's."""
    from nca_kernels.train import ScriptArguments, build_trainer
    from nca_kernels.trainer import NCAConfig

    model, data = model_and_data
    tok = char_tokenizer()
    tiny_llama(len(tok), seed=1).save_pretrained(tmp_path / "ref")
    config = NCAConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_length=64,
                       max_prompt_length=32)

    def ref_logps(policy, ref=None):
        script = ScriptArguments(model_name_or_path=policy, ref_model_name_or_path=ref, dataset=data)
        return build_trainer(script, config).train_dataset["ref_logps"]

    with_ref = ref_logps(model, str(tmp_path / "ref"))
    assert with_ref != ref_logps(model)
    tok.save_pretrained(tmp_path / "ref")
    assert with_ref == ref_logps(str(tmp_path / "ref"))


def test_cli_loads_the_weights_in_the_dtype_asked_for(model_and_data, tmp_path):
    model, data = model_and_data
    args = cli_args(model, data, str(tmp_path / "bf16"), 4)
    args[args.index("--max_steps") + 1] = "1"
    main([*args, "--dtype", "bfloat16"])
    weights = load_file(os.path.join(tmp_path / "bf16", "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun() -> list[str]:
    return ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def accelerate() -> list[str]:  # on a free port, not the fixed default that a concurrent run may hold
    return ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]


#: The Trainer's own FSDP2 settings, as on a GPU; on CPU accelerate ignores them and runs DDP.
FSDP2 = ["--fsdp", "full_shard", "--fsdp_config",
         json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})]
LAUNCHERS = {"torchrun": (torchrun, []), "accelerate": (accelerate, []), "torchrun --fsdp": (torchrun, FSDP2)}


def logged(out: str) -> list[dict]:
    """Our entries of the log history of the checkpoint at step 3: the training loss and the metrics
    (Trainer's own eval_loss weights the padded last batch's mean by its real rows: left out)."""
    with open(os.path.join(out, "checkpoint-3", "trainer_state.json")) as f:
        return [{k: v for k, v in entry.items() if "/" in k or k == "loss"} for entry in json.load(f)["log_history"]]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_match_one(model_and_data, tmp_path, launcher):
    """2 gloo processes x 2 prompts end on the same weights, and log the same metrics, as 1 process x
    4 prompts: the training metrics gathered per step, the evaluation's over 7 prompts in uneven
    batches (the padding rows of the last one dropped). ``--fsdp`` on CPU, which accelerate does not
    shard, says so and trains the same."""
    model, data = model_and_data
    evaluation = ["--eval_dataset", data.replace("data.parquet", "eval.parquet"), "--eval_strategy", "steps",
                  "--eval_steps", "3", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3"]
    main([*cli_args(model, data, str(tmp_path / "one"), 4), *evaluation, "--per_device_eval_batch_size", "4"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    launch, extra = LAUNCHERS[launcher]
    proc = subprocess.run(
        [sys.executable, "-m", *launch(), "-m", "nca_kernels.train", *cli_args(model, data, str(tmp_path / "two"), 2),
         *evaluation, "--per_device_eval_batch_size", "2", *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("accelerate does not shard on cpu" in proc.stderr) == bool(extra)
    one, two, start = (load_file(os.path.join(d, "model.safetensors"))
                       for d in (tmp_path / "one", tmp_path / "two", model))
    assert os.path.isfile(tmp_path / "two" / "tokenizer.json")
    for name in one:
        assert not torch.equal(one[name], start[name]), name
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    ours, theirs = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert [sorted(e) for e in ours] == [sorted(e) for e in theirs]
    assert sum("eval_rewards/accuracy" in e for e in ours) == 1 and sum("loss" in e for e in ours) == 3
    for want, got in zip(ours, theirs):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_resume_from_checkpoint_is_forwarded(model_and_data, tmp_path):
    """--resume_from_checkpoint restores the checkpoint's weights and step: resumed at step 3 of 4, the
    saved model is one Adam step (about the learning rate, 1e-3, per weight) from the checkpoint's, here
    moved by 0.5 so that training afresh could not come near it."""
    model, data = model_and_data
    main([*cli_args(model, data, str(tmp_path / "run"), 4), "--save_strategy", "steps", "--save_steps", "3"])
    checkpoint = tmp_path / "run" / "checkpoint-3"
    moved = {k: v + 0.5 for k, v in load_file(checkpoint / "model.safetensors").items()}
    save_file(moved, checkpoint / "model.safetensors", metadata={"format": "pt"})
    args = cli_args(model, data, str(tmp_path / "resumed"), 4)
    args[args.index("--max_steps") + 1] = "4"
    main([*args, "--resume_from_checkpoint", str(checkpoint)])
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name, value in moved.items():
        step = (resumed[name] - value).abs().max().item()
        assert 0 < step < 2e-3, (name, step)


def test_missing_dataset_is_a_usage_error(model_and_data, tmp_path, capsys):
    model, _ = model_and_data
    with pytest.raises(SystemExit) as e:
        main(["--output_dir", str(tmp_path), "--model_name_or_path", model, "--dataset", str(tmp_path / "no.jsonl")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_eval_dataset_is_used(model_and_data, tmp_path):
    model, data = model_and_data
    config = NCAConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], max_length=64, max_prompt_length=32)
    t = build_trainer(ScriptArguments(model_name_or_path=model, dataset=data, eval_dataset=data), config)
    assert t.eval_dataset is not None and "ref_logps" in t.eval_dataset.column_names


def test_cli_demo_gets_its_settings(tmp_path, monkeypatch):
    """--demo runs the demo (no model or data needed) with the parsed settings, --compare included."""
    from nca_kernels.trainer import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda config, demo_args, compare=False: calls.append(
        (config.output_dir, demo_args.demo_prompts, compare)))
    for flags in ([], ["--compare"]):
        main(["--demo", *flags, "--output_dir", str(tmp_path), "--demo_prompts", "16"])
    assert calls == [(str(tmp_path), 16, False), (str(tmp_path), 16, True)]
