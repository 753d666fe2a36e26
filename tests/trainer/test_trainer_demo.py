"""The embedded demo at reduced size: a real improvement, its outputs, its task, and the plain CLI on them."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from datasets import Dataset

from nca_kernels.train import main
from nca_kernels.trainer import NCAConfig, demo
from nca_kernels.trainer.demo import DemoArguments, make_prompts, mean_reward, reward, run_demo

from .common import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = (1, 2, 3)
SMALL = DemoArguments(demo_prompts=128, demo_sft_steps=120, demo_epochs=3.0, demo_eval_samples=8)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """seed -> (output dir, summary entries); the first seed also runs InfoNCA (--compare)."""
    runs = {}
    for seed in SEEDS:
        out = str(tmp_path_factory.mktemp(f"demo{seed}"))
        run_demo(NCAConfig(output_dir=out, seed=seed, report_to=[]), SMALL, compare=seed == SEEDS[0])
        with open(os.path.join(out, "summary.json")) as f:
            runs[seed] = out, json.load(f)
    return runs


def test_improvement_exceeds_the_spread_between_seeds(demo_runs):
    nca = [next(e for e in entries if e["loss_type"] == "nca") for _, entries in demo_runs.values()]
    before = [e["reward_before"] for e in nca]
    after = [e["reward_after"] for e in nca]
    gain = sum(after) / len(after) - sum(before) / len(before)
    spread = max(max(before) - min(before), max(after) - min(after))
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert gain > spread, (before, after)


def test_outputs(demo_runs):
    out, entries = demo_runs[SEEDS[0]]
    assert [e["loss_type"] for e in entries] == ["nca", "infonca"]
    keys = {"loss_type", "reward_before", "reward_after", "chosen_logp_before", "chosen_logp_after", "steps",
            "seconds"}
    for e in entries:
        assert keys <= set(e) and e["steps"] == 24 and e["seconds"] > 0
    with open(os.path.join(out, "likelihood.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == SMALL.demo_prompts and all(len(r["responses"]) == len(r["rewards"]) == 4 for r in rows)
    assert os.path.isfile(os.path.join(out, "reference", "config.json"))
    assert os.path.isfile(os.path.join(out, "reference", "tokenizer.json"))


def test_plain_cli_trains_on_the_demo_outputs(demo_runs, tmp_path):
    out, _ = demo_runs[SEEDS[0]]
    main(["--model_name_or_path", os.path.join(out, "reference"), "--dataset", os.path.join(out, "data.jsonl"),
          "--output_dir", str(tmp_path), "--max_steps", "2", "--use_cpu", "--report_to", "none",
          "--save_strategy", "no", "--disable_tqdm", "true"])
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "tokenizer.json")


def test_task_reward_and_prompts():
    """The reward is the share of the eight response letters that are the prompt's first letter (other
    prompt letters and letters past the eighth do not count); prompts are six letters and '='."""
    assert reward("abcdef=", "aaaabbbb") == 0.5
    assert reward("fabcde=", "abcdeabc") == 0.0
    assert reward("abcdef=", "bbbbbbbbaaaa") == 0.0
    assert mean_reward(["a=", "b="], [["aaaaaaaa", "bbbbbbbb"], ["bbbbbbbb", "bbbbbbbb"]]) == 0.75
    prompts = make_prompts(20, random.Random(0))
    assert all(len(p) == 7 and p[-1] == "=" and set(p[:-1]) <= set("abcdef") for p in prompts)


def test_chosen_logp_is_the_top_reward_responses():
    """The summary's chosen log-likelihood averages each prompt's top-reward response."""
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -5.0]])
    assert demo._chosen_logp(logps, Dataset.from_dict({"rewards": [[0.0, 1.0], [1.0, 0.0]]})) == -2.5


def test_demo_runs_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    """The demo runs on one CPU thread and gives the caller back its own thread count."""
    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda *args: seen.append(torch.get_num_threads()) or [])
    torch.set_num_threads(2)
    assert run_demo(NCAConfig(output_dir=str(tmp_path), report_to=[]), SMALL) == []
    assert seen == [1] and torch.get_num_threads() == 2
