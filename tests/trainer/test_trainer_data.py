"""Reward dataset layouts, row validation, truncation, chat templates and the collator."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from datasets import Dataset, DatasetDict

from nca_kernels.trainer import NCACollator, NCAConfig, detect_format, load_reward_dataset, prepare_dataset
from nca_kernels.trainer.data import normalize, tokenize

from .common import char_tokenizer, reward_rows

ROWS = [{"prompt": "p0", "responses": ["a", "bb", "c"], "rewards": [1.0, 0.5, 0.0]},
        {"prompt": "p1", "responses": ["d", "e", "ff"], "rewards": [0.0, 2.0, 1.0]}]


def test_detect_format():
    assert detect_format(["prompt", "responses", "rewards"]) == "rewards"
    assert detect_format(["prompt", "A0", "A1", "score_A0", "score_A1", "source"]) == "ultrafeedback"
    assert detect_format(["prompt", "chosen", "rejected"]) == "pairwise"
    with pytest.raises(ValueError, match="cannot tell the dataset format.*'text'"):
        detect_format(["text"])


def test_three_layouts_normalise_to_one():
    rows, fmt = normalize(Dataset.from_list(ROWS))
    assert fmt == "rewards" and rows[1] == ROWS[1]
    uf = [{"prompt": r["prompt"], **{f"A{i}": x for i, x in enumerate(r["responses"])},
           **{f"score_A{i}": x for i, x in enumerate(r["rewards"])}} for r in ROWS]
    rows, fmt = normalize(Dataset.from_list(uf))
    assert fmt == "ultrafeedback" and rows.to_list() == ROWS
    rows, fmt = normalize(Dataset.from_list([{"prompt": "p", "chosen": "good", "rejected": "bad"}]))
    assert fmt == "pairwise" and rows[0] == {"prompt": "p", "responses": ["good", "bad"], "rewards": [1.0, 0.0]}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": None}, "row 1: missing prompt"),
    ({"responses": None}, "row 1: missing responses"),
    ({"rewards": None}, "row 1: missing rewards"),
    ({"responses": ["a", "b"], "rewards": [0.0, 1.0]}, "row 1: has K=2 responses, expected K=3 as row 0 has"),
    ({"rewards": [0.0, math.nan, 1.0]}, "row 1: reward 1 is nan"),
    ({"rewards": [0.0, math.inf, 1.0]}, "row 1: reward 1 is inf"),
    ({"rewards": [0.0, 1.0]}, "row 1: 3 responses but 2 rewards"),
])
def test_bad_rows_are_named(bad, message):
    rows = [dict(ROWS[0]), {**ROWS[1], **bad}]
    with pytest.raises(ValueError, match=message):
        normalize(Dataset.from_list(rows))


def test_bad_row_in_a_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "p2", "responses": ["a"]}\n')
    with pytest.raises(ValueError, match="row 2: missing rewards"):
        prepare_dataset(load_reward_dataset(str(path)), char_tokenizer(), 64, 32)


def test_config_k_is_checked():
    with pytest.raises(ValueError, match="row 0: has K=3 responses, expected K=4 as the K setting has"):
        normalize(Dataset.from_list(ROWS), k=4)


def test_load_files_and_directories(tmp_path):
    ds = Dataset.from_list(ROWS)
    ds.to_json(tmp_path / "d.jsonl")
    ds.to_json(tmp_path / "D.JSONL")  # the extension is matched whatever its case
    ds.to_parquet(tmp_path / "d.parquet")
    DatasetDict({"train": ds}).save_to_disk(tmp_path / "dd")
    ds.save_to_disk(tmp_path / "d")
    for name in ("d.jsonl", "D.JSONL", "d.parquet", "dd", "d"):
        assert load_reward_dataset(str(tmp_path / name)).to_list() == ROWS, name
    with pytest.raises(ValueError, match="expected a .json, .jsonl or .parquet"):
        load_reward_dataset(str(tmp_path / "d.csv"))


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_appends_eos_and_truncates_prompt_first():
    tok = char_tokenizer()
    rows, _ = normalize(Dataset.from_list([{"prompt": "abcdefghij", "responses": ["xy", "z" * 12],
                                            "rewards": [0.0, 1.0]}]))
    short = tokenize(rows, tok, max_length=64, max_prompt_length=8)[0]
    assert short["prompt_ids"] == [tok.bos_token_id] + ids_of(tok, "abcdefghij")
    assert short["response_ids"] == [ids_of(tok, "xy") + [tok.eos_token_id], ids_of(tok, "z" * 12) + [tok.eos_token_id]]
    # 11 + 13 tokens > 16: the prompt keeps BOS and its last 5 tokens, then responses are cut to 16 - 6 = 10.
    cut = tokenize(rows, tok, max_length=16, max_prompt_length=6)[0]
    assert cut["prompt_ids"] == [tok.bos_token_id] + ids_of(tok, "fghij")
    assert cut["response_ids"] == [ids_of(tok, "xy") + [tok.eos_token_id], ids_of(tok, "z" * 10)]


def test_a_prompt_cut_below_its_leading_tokens_keeps_its_last_tokens():
    tok = char_tokenizer()
    rows, _ = normalize(Dataset.from_list([{"prompt": "abcdefghij", "responses": ["x", "yy"], "rewards": [0.0, 1.0]}]))
    out = tokenize(rows, tok, max_length=8, max_prompt_length=1)[0]
    assert out["prompt_ids"] == ids_of(tok, "j")
    assert out["response_ids"] == [ids_of(tok, "x") + [tok.eos_token_id], ids_of(tok, "yy") + [tok.eos_token_id]]


def test_prompt_takes_the_leading_special_tokens_only():
    """A tokenizer that also appends EOS (Llama's ``add_eos_token``) puts none between prompt and response."""
    tok = char_tokenizer(eos_after=True)
    assert tok("ab")["input_ids"][-1] == tok.eos_token_id
    rows, _ = normalize(Dataset.from_list([{"prompt": "ab", "responses": ["x", "y"], "rewards": [0.0, 1.0]}]))
    out = tokenize(rows, tok, max_length=64, max_prompt_length=8)[0]
    assert out["prompt_ids"] == [tok.bos_token_id] + ids_of(tok, "ab")
    assert out["response_ids"] == [ids_of(tok, "x") + [tok.eos_token_id], ids_of(tok, "y") + [tok.eos_token_id]]


def test_reference_logps_in_the_data_are_kept():
    """A ``ref_logps`` column (or TRL's ``ref_chosen_logps`` / ``ref_rejected_logps``) survives
    normalisation and tokenisation; bad values are named."""
    rows = [{**r, "ref_logps": [-1.0 - i, -2.0, -3.0]} for i, r in enumerate(ROWS)]
    data, _ = prepare_dataset(Dataset.from_list(rows), char_tokenizer(), 64, 32)
    assert data["ref_logps"] == [r["ref_logps"] for r in rows]
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}]
    data, fmt = prepare_dataset(Dataset.from_list(pairs), char_tokenizer(), 64, 32)
    assert fmt == "pairwise" and data["ref_logps"] == [[-1.5, -2.5]]
    rows[1]["ref_logps"] = [-1.0, math.nan, -3.0]
    with pytest.raises(ValueError, match="row 1: ref_logps 1 is nan"):
        normalize(Dataset.from_list(rows))
    rows[0]["ref_logps"] = None  # the column exists: a row without values is refused, not recomputed
    with pytest.raises(ValueError, match="row 0: missing ref_logps"):
        normalize(Dataset.from_list(rows))


def test_unsupported_datasets_refused():
    with pytest.raises(ValueError, match="row 0: responses and rewards must be lists, got str"):
        normalize(Dataset.from_list([{"prompt": "p", "responses": "ab", "rewards": [1.0, 0.0]}]))
    no_eos = char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="row 0: response 1 has no tokens"):
        prepare_dataset(Dataset.from_list([{"prompt": "p", "responses": ["a", ""], "rewards": [1.0, 0.0]}]), no_eos,
                        64, 32)
    with pytest.raises(ValueError, match="the dataset has no rows"):
        normalize(Dataset.from_dict({"prompt": [], "responses": [], "rewards": []}))
    with pytest.raises(TypeError, match="expected a datasets.Dataset, got IterableDataset"):
        prepare_dataset(Dataset.from_list(ROWS).to_iterable_dataset(), char_tokenizer(), 64, 32)


def test_chat_messages_use_the_template():
    tok = char_tokenizer(chat=True)
    prompt = [{"role": "user", "content": "hi"}]
    row = {"prompt": prompt, "responses": [prompt + [{"role": "assistant", "content": "yo"}],
                                           [{"role": "assistant", "content": "no"}]], "rewards": [1.0, 0.0]}
    out = tokenize(normalize(Dataset.from_list([row]))[0], tok, 64, 32)[0]
    assert out["prompt_ids"] == ids_of(tok, "<user>hi<assistant>")
    assert out["response_ids"] == [ids_of(tok, "yo"), ids_of(tok, "no")]
    with pytest.raises(ValueError, match="row 0: chat messages given but the tokenizer has no chat template"):
        tokenize(normalize(Dataset.from_list([row]))[0], char_tokenizer(), 64, 32)


def test_collator_keeps_groups_contiguous_and_masks_prompt_and_padding():
    tok = char_tokenizer()
    data, _ = prepare_dataset(Dataset.from_list(reward_rows(3, k=4)), tok, 64, 32)
    data = data.add_column("ref_logps", [[-1.0, -2.0, -3.0, -4.0]] * 3)
    batch = NCACollator(tok.pad_token_id)([data[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 12 and batch["rewards"].shape == batch["ref_logps"].shape == (3, 4)
    assert batch["rewards"].dtype == batch["ref_logps"].dtype == torch.float32
    for b in range(3):
        row = data[b]
        n_prompt = len(row["prompt_ids"])
        for i, resp in enumerate(row["response_ids"]):
            s = b * 4 + i
            n = n_prompt + len(resp)
            assert batch["input_ids"][s, :n].tolist() == row["prompt_ids"] + resp
            assert (batch["labels"][s, :n_prompt] == -100).all() and (batch["labels"][s, n:] == -100).all()
            assert batch["labels"][s, n_prompt:n].tolist() == resp
            assert batch["attention_mask"][s].sum() == n and (batch["input_ids"][s, n:] == tok.pad_token_id).all()
        assert torch.equal(batch["rewards"][b], torch.tensor(row["rewards"], dtype=torch.float32))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": 32, "max_prompt_length": 32}, "max_prompt_length < max_length"),
    ({"loss_type": "ipo"}, "loss_type must be one of"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"K": 1}, "K must be at least 2"),
])
def test_config_rejects_bad_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        NCAConfig(output_dir=str(tmp_path), **kwargs)


def test_config_defaults_follow_the_paper(tmp_path):
    """The paper's recipe (cosine schedule, 10% warmup) and the package's own defaults: K from the data,
    summed log-probs, the auto backend, logits recomputed in backward."""
    cfg = NCAConfig(output_dir=str(tmp_path))
    assert (cfg.beta, cfg.alpha, cfg.loss_type, cfg.learning_rate) == (0.01, 1e-4, "nca", 5e-6)
    assert (cfg.max_length, cfg.max_prompt_length, cfg.remove_unused_columns) == (1024, 512, False)
    assert (cfg.lr_scheduler_type, cfg.warmup_steps) == ("cosine", 0.1)
    assert (cfg.K, cfg.average, cfg.backend, cfg.recompute) == (None, False, "auto", True)


def test_a_row_with_any_message_list_is_templated_whole():
    """A pairwise row whose rejected response is a message list and whose chosen one is a string:
    both go through the template (the string as the assistant's turn), behind one prompt."""
    tok = char_tokenizer(chat=True)
    for chosen, rejected in (("yo", [{"role": "assistant", "content": "no"}]),
                             ([{"role": "assistant", "content": "yo"}], "no")):
        row = {"prompt": "hi", "chosen": chosen, "rejected": rejected}
        out = prepare_dataset(Dataset.from_list([row]), tok, 64, 32)[0][0]
        assert out["prompt_ids"] == ids_of(tok, "<user>hi<assistant>")
        assert out["response_ids"] == [ids_of(tok, "yo"), ids_of(tok, "no")]


def test_full_conversations_drop_the_prompt_by_role_and_content():
    """Arrow gives every message the keys of all of them (None where absent): the prompt is still
    recognised at the start of a conversation."""
    tok = char_tokenizer(chat=True)
    row = {"prompt": [{"role": "user", "content": "hi"}],
           "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "bot"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    assert Dataset.from_list([row])[0]["chosen"][0] == {"role": "user", "content": "hi", "name": None}
    out = prepare_dataset(Dataset.from_list([row]), tok, 64, 32)[0][0]
    assert out["response_ids"] == [ids_of(tok, "yo"), ids_of(tok, "no")]


def test_lengths_and_empty_prompts_refused():
    rows = Dataset.from_list(ROWS)
    for max_length, max_prompt_length in ((8, 8), (8, 20), (1, 0)):
        with pytest.raises(ValueError, match="need 0 < max_prompt_length < max_length"):
            prepare_dataset(rows, char_tokenizer(), max_length, max_prompt_length)
    from tokenizers import normalizers

    no_bos = char_tokenizer()  # no leading tokens, and spaces stripped: a blank prompt has no tokens
    no_bos._tokenizer.post_processor = None
    no_bos._tokenizer.normalizer = normalizers.Strip()
    assert no_bos(" a ")["input_ids"] == ids_of(no_bos, "a") and not ids_of(no_bos, "   ")
    with pytest.raises(ValueError, match="row 0: the prompt has no tokens"):
        prepare_dataset(Dataset.from_list([{"prompt": "   ", "responses": ["a", "b"], "rewards": [1.0, 0.0]}]), no_bos,
                        64, 32)


def test_pretokenised_rows_are_checked():
    tok = char_tokenizer()
    good = {"prompt_ids": [1, 5], "response_ids": [[6, 2], [7, 2]], "rewards": [1.0, 0.0]}
    assert prepare_dataset(Dataset.from_list([good]), tok, 64, 32)[1] == "tokenized"
    for bad, message in (({"rewards": [math.nan, 0.0]}, "row 1: reward 0 is nan"),
                         ({"response_ids": [[6, 2], []]}, "row 1: response 1 has no tokens"),
                         ({"rewards": [1.0, 0.0, 3.0]}, "row 1: 2 responses but 3 rewards"),
                         ({"response_ids": [[6], [7], [8]], "rewards": [1.0, 0.0, 3.0]}, "row 1: has K=3"),
                         ({"prompt_ids": []}, "row 1: empty prompt"),
                         ({"response_ids": [[6, 2], [7, len(tok)]]},
                          f"row 1: response_ids 1 holds {len(tok)}, not a token id of the tokenizer (0 to "
                          f"{len(tok) - 1})"),
                         ({"prompt_ids": [-1, 5]}, "row 1: prompt_ids holds -1")):
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare_dataset(Dataset.from_list([good, {**good, **bad}]), tok, 64, 32)
    with pytest.raises(ValueError, match=re.escape("row 0: ref_logps 1 is")):
        prepare_dataset(Dataset.from_list([{**good, "ref_logps": [-1.0, 1e39]}]), tok, 64, 32)
    with pytest.raises(ValueError, match="need 0 < max_prompt_length < max_length"):
        prepare_dataset(Dataset.from_list([good]), tok, 8, 8)


def test_pretokenised_rows_are_truncated_like_text():
    """A tokenised row longer than max_length is cut as the same row given as text would be, also
    when a later row needs no cut."""
    tok = char_tokenizer()
    text = [{"prompt": "abcdefghij", "responses": ["klmnop", "q"], "rewards": [1.0, 0.0]},
            {"prompt": "a", "responses": ["b", "c"], "rewards": [1.0, 0.0]}]
    tokenised = prepare_dataset(Dataset.from_list(text), tok, 64, 32)[0]
    assert len(tokenised[0]["prompt_ids"]) + len(tokenised[0]["response_ids"][0]) > 10
    for max_length, max_prompt_length in ((10, 4), (10, 1), (12, 8)):
        want = prepare_dataset(Dataset.from_list(text), tok, max_length, max_prompt_length)[0]
        got = prepare_dataset(tokenised, tok, max_length, max_prompt_length)[0]
        assert got.to_list() == want.to_list(), (max_length, max_prompt_length)
    assert prepare_dataset(tokenised, tok, 64, 32)[0] is tokenised  # nothing to cut: the dataset as given


def test_implicit_prompt():
    """TRL's implicit prompt: without a prompt column, chosen and rejected share it."""
    tok = char_tokenizer(chat=True)
    explicit = prepare_dataset(Dataset.from_list([{"prompt": "Q: hi\nA:", "chosen": " yes", "rejected": " no"}]),
                               tok, 64, 32)[0]
    implicit = prepare_dataset(Dataset.from_list([{"chosen": "Q: hi\nA: yes", "rejected": "Q: hi\nA: no"}]),
                               tok, 64, 32)
    assert implicit[1] == "pairwise" and implicit[0].to_list() == explicit.to_list()
    user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    conversation = [{"chosen": [*user, {"role": "assistant", "content": "yes"}],
                     "rejected": [*user, {"role": "assistant", "content": "no"}]}]
    want = prepare_dataset(Dataset.from_list([{"prompt": user, "chosen": conversation[0]["chosen"][2:],
                                               "rejected": conversation[0]["rejected"][2:]}]), tok, 64, 32)[0]
    assert prepare_dataset(Dataset.from_list(conversation), tok, 64, 32)[0].to_list() == want.to_list()
    for row, message in (({"chosen": "yes", "rejected": "no"}, "nothing is shared"),
                         ({"chosen": "Q: a", "rejected": "Q: ab"}, "one is all prompt"),
                         ({"chosen": "Q: a", "rejected": [{"role": "user", "content": "Q: b"}]},
                          "must both be strings or both chat message lists"),
                         ({"chosen": "Q: a", "rejected": None}, "row 0: missing response [1]")):
        with pytest.raises(ValueError, match=re.escape(message)):
            normalize(Dataset.from_list([row]))


def test_implicit_prompt_edges():
    user = [{"role": "user", "content": "hi"}]
    chosen = [*user, {"role": "assistant", "content": "yes"}]
    rejected = [{**m, "name": None} for m in [*user, {"role": "assistant", "content": "no"}]]  # extra keys
    out = normalize(Dataset.from_list([{"chosen": chosen, "rejected": rejected}]))[0][0]
    assert out["prompt"] == user and [r[0]["content"] for r in out["responses"]] == ["yes", "no"]
    turns = [*chosen, {"role": "user", "content": "more"}]
    assert normalize(Dataset.from_list([{"chosen": [*turns, {"role": "assistant", "content": "a"}],
                                         "rejected": [*turns, {"role": "assistant", "content": "b"}]}]))[0][0][
        "prompt"] == turns  # multi-turn: the shared part may hold assistant turns
    for row, problem in (({"chosen": "yes ", "rejected": "no"}, "nothing is shared"),
                         ({"chosen": "Q: ab", "rejected": "Q: a"}, "one is all prompt"),
                         ({"chosen": "Q: a ", "rejected": "Q: a "}, "they are identical"),
                         ({"chosen": [*chosen, {"role": "user", "content": "x"}],
                           "rejected": [*chosen, {"role": "user", "content": "y"}]},
                          "they differ from a turn that is not the assistant's"),
                         ({"chosen": chosen, "rejected": [*user, {"role": "user", "content": "no"}]},
                          "they differ from a turn that is not the assistant's")):
        with pytest.raises(ValueError, match=re.escape(f"row 0: without a prompt column, chosen and rejected must "
                                                       f"start with a shared prompt and go on to differ in the "
                                                       f"assistant's reply ({problem})")):
            normalize(Dataset.from_list([row]))
    rows = [{"prompt": p, "chosen": "Q: a", "rejected": "Q: b"} for p in ("Q:", None)]
    with pytest.raises(ValueError, match=re.escape("row 1: missing prompt")):  # a prompt column is never inferred
        normalize(Dataset.from_list(rows))


def test_pretokenised_ids_must_be_ints_of_the_whole_tokenizer():
    tok = char_tokenizer()
    good = {"prompt_ids": [1, 5], "response_ids": [[6, 2], [7, 2]], "rewards": [1.0, 0.0]}
    for bad, held in (({"prompt_ids": [1.0, 5.0]}, "1.0"), ({"response_ids": [[True], [True]]}, "True"),
                      ({"prompt_ids": [1, None, 5]}, "None"), ({"response_ids": [[6, -1, 2], [7, 2]]}, "-1")):
        with pytest.raises(ValueError, match=re.escape(f"row 0: {next(iter(bad))}") + ".* holds " + held):
            prepare_dataset(Dataset.from_list([{**good, **bad}]), tok, 64, 32)
    tok.add_tokens(["<extra>"])  # added tokens count: len(tokenizer), not its base vocab_size
    assert len(tok) > tok.vocab_size
    row = {**good, "response_ids": [[6, len(tok) - 1], [7, 2]]}
    assert prepare_dataset(Dataset.from_list([row]), tok, 64, 32)[0].to_list() == [row]


def test_pretokenised_prompt_without_bos_keeps_its_last_tokens():
    tok = char_tokenizer()
    row = {"prompt_ids": list(range(10, 20)), "response_ids": [[30] * 8, [31, 2]], "rewards": [1.0, 0.0]}
    got = prepare_dataset(Dataset.from_list([row]), tok, 12, 4)[0][0]
    assert got["prompt_ids"] == [16, 17, 18, 19] and got["response_ids"] == [[30] * 8, [31, 2]]


def test_rows_cut_with_precomputed_reference_refused():
    """Reference log-probs given with the data score the row uncut: a row that must be cut is refused."""
    tok = char_tokenizer()
    ref = {"rewards": [1.0, 0.0], "ref_logps": [-3.0, -1.0]}
    for short, long in (({"prompt_ids": [5], "response_ids": [[6], [7]]},
                         {"prompt_ids": [5] * 20, "response_ids": [[6] * 20, [7] * 3]}),
                        ({"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p" * 20, "responses": ["a" * 20, "b"]})):
        rows = Dataset.from_list([{**short, **ref}, {**short, **ref}, {**long, **ref}])
        with pytest.raises(ValueError, match="row 2: longer than max_length=16 tokens, so it would be cut, but its "
                                             "precomputed ref_logps score it uncut"):
            prepare_dataset(rows, tok, 16, 8)
        assert prepare_dataset(rows, tok, 64, 32)[0]["ref_logps"] == [[-3.0, -1.0]] * 3


def test_trl_reference_columns():
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match="row 0: ref_logps 0 is None"):  # one column alone is not enough
        normalize(Dataset.from_list([{**pair, "ref_rejected_logps": -2.5}]))
    with pytest.raises(ValueError, match="belong to the pairwise layout"):
        normalize(Dataset.from_list([{**ROWS[0], "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}]))
    with pytest.raises(ValueError, match="row 0: reward 1 is -1e"):
        normalize(Dataset.from_list([{**ROWS[0], "rewards": [1.0, -1e300, 0.0]}]))


def test_uf_unmatched_columns():
    rows = [{"prompt": "p", "A0": "a", "A1": "b", "A2": "c", "score_A0": 1.0, "score_A1": 0.0}]
    with pytest.raises(ValueError, match=r"unmatched \['A2'\]"):
        normalize(Dataset.from_list(rows))


@pytest.mark.parametrize("bad, message", [
    ({"prompt": ""}, "row 1: empty prompt"),
    ({"responses": ["d", None, "ff"]}, r"row 1: missing response \[1\]"),
    ({"ref_logps": [-1.0, -2.0]}, "row 1: 3 responses but 2 ref_logps values"),
])


def test_more_bad_rows(bad, message):
    rows = [{**ROWS[0], "ref_logps": [-1.0, -2.0, -3.0]}, {**ROWS[1], "ref_logps": [-1.0, -2.0, -3.0], **bad}]
    with pytest.raises(ValueError, match=message):
        normalize(Dataset.from_list(rows))


def test_k1_refused():
    with pytest.raises(ValueError, match="needs at least 2 responses"):
        normalize(Dataset.from_list([{"prompt": "p", "responses": ["a"], "rewards": [1.0]}]))


def test_bool_rewards_refused():
    with pytest.raises(ValueError, match="reward 0 is True"):
        normalize(Dataset.from_list([{"prompt": "p", "responses": ["a", "b"], "rewards": [True, False]}]))


def test_text_ending_in_eos_gets_one():
    tok = char_tokenizer()
    rows, _ = normalize(Dataset.from_list([{"prompt": "p", "responses": ["x<eos>", "y"], "rewards": [0.0, 1.0]}]))
    out = tokenize(rows, tok, 64, 8)[0]
    assert out["response_ids"][0] == ids_of(tok, "x") + [tok.eos_token_id]


def test_exact_fit_is_not_cut():
    tok = char_tokenizer()  # 1 + 10 prompt + 4 + eos = 16 = max_length
    rows, _ = normalize(Dataset.from_list([{"prompt": "abcdefghij", "responses": ["wxyz", "v"],
                                            "rewards": [0.0, 1.0]}]))
    out = tokenize(rows, tok, max_length=16, max_prompt_length=6)[0]
    assert out["prompt_ids"] == [tok.bos_token_id] + ids_of(tok, "abcdefghij")


def test_short_prompt_leaves_room_for_responses():
    tok = char_tokenizer()
    rows, _ = normalize(Dataset.from_list([{"prompt": "ab", "responses": ["z" * 20, "v"], "rewards": [0.0, 1.0]}]))
    out = tokenize(rows, tok, max_length=16, max_prompt_length=8)[0]
    assert len(out["prompt_ids"]) == 3 and len(out["response_ids"][0]) == 13


def test_tokenized_k_checked():
    d = Dataset.from_list([{"prompt_ids": [1], "response_ids": [[5], [6]], "rewards": [0.0, 1.0]},
                           {"prompt_ids": [1], "response_ids": [[5], [6], [7]], "rewards": [0.0, 1.0, 2.0]}])
    with pytest.raises(ValueError, match="row 1: has K=3"):
        prepare_dataset(d, char_tokenizer(), 64, 32)
    with pytest.raises(ValueError, match="row 0: has K=2 responses, expected K=3 as the K setting has"):
        prepare_dataset(d.select([0]), char_tokenizer(), 64, 32, k=3)


def test_template_prefix_checked():
    tok = char_tokenizer(chat=True)
    tok.chat_template = tok.chat_template.replace("<assistant>{% endif %}", "<assistant>:{% endif %}")
    row = {"prompt": [{"role": "user", "content": "hi"}], "responses": ["yo", "no"], "rewards": [1.0, 0.0]}
    with pytest.raises(ValueError, match="prefix of the conversation"):
        tokenize(normalize(Dataset.from_list([row]))[0], tok, 64, 32)


def test_chat_prompt_plain_responses():
    tok = char_tokenizer(chat=True)
    row = {"prompt": [{"role": "user", "content": "hi"}], "responses": ["yo", "no"], "rewards": [1.0, 0.0]}
    out = tokenize(normalize(Dataset.from_list([row]))[0], tok, 64, 32)[0]
    assert out["prompt_ids"] == ids_of(tok, "<user>hi<assistant>")
    assert out["response_ids"] == [ids_of(tok, "yo"), ids_of(tok, "no")]


def test_response_without_new_message():
    tok = char_tokenizer(chat=True)
    p = [{"role": "user", "content": "hi"}]
    row = {"prompt": p, "responses": [p, p + [{"role": "assistant", "content": "x"}]], "rewards": [1.0, 0.0]}
    with pytest.raises(ValueError, match="holds no message beyond the prompt"):
        tokenize(normalize(Dataset.from_list([row]))[0], tok, 64, 32)


def test_dataset_dict_train_split(tmp_path):
    """A saved DatasetDict gives its train split; one without a train split is refused, naming the splits."""
    DatasetDict({"test": Dataset.from_list(ROWS[:1]), "train": Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "dd")
    assert load_reward_dataset(str(tmp_path / "dd")).to_list() == ROWS
    DatasetDict({"test": Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "no_train")
    with pytest.raises(ValueError, match=re.escape("holds splits ['test'], none named 'train'")):
        load_reward_dataset(str(tmp_path / "no_train"))


@pytest.mark.parametrize("kwargs", [{"max_prompt_length": 0}, {"backend": "bogus"}])


def test_config_more_bad(tmp_path, kwargs):
    with pytest.raises(ValueError):
        NCAConfig(output_dir=str(tmp_path), **kwargs)


def test_config_forces_remove_unused_columns_off(tmp_path):
    assert NCAConfig(output_dir=str(tmp_path), remove_unused_columns=True).remove_unused_columns is False


def test_ref_logps_column_wins_over_trl_columns():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "ref_logps": [-1.0, -2.0], "ref_chosen_logps": -5.0,
             "ref_rejected_logps": -6.0}]
    assert normalize(Dataset.from_list(rows))[0]["ref_logps"] == [[-1.0, -2.0]]
