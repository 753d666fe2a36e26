"""Reward datasets: loading, the three accepted layouts, tokenisation and the collator.

Accepted layouts, detected from the column names:

1. ``rewards``: ``prompt``, ``responses`` (K strings), ``rewards`` (K floats), any K >= 2.
2. ``ultrafeedback``: the official UltraFeedback reward layout, ``prompt``, ``A0 .. A{K-1}`` and
   ``score_A0 .. score_A{K-1}``.
3. ``pairwise``: ``prompt``, ``chosen``, ``rejected``; K=2 with alpha=0 semantics (DPO / nca_pair).
   Without ``prompt`` (TRL's implicit prompt) the prompt is what ``chosen`` and ``rejected`` share:
   their common leading messages (they must part at the assistant's turn), or for strings their
   common leading text (a space at its end left to the responses).

Prompts and responses are strings, or chat message lists (``[{"role": ..., "content": ...}]``)
rendered with the tokenizer's chat template; a response list may repeat the prompt's messages
first (full conversations, as in UltraFeedback), they are dropped.

Truncation, when the prompt plus the longest response exceeds ``max_length`` tokens (tokenised
rows too): the prompt is cut first, to its last ``max_prompt_length`` tokens; then every response
is cut to the tokens that still fit. A row that carries reference log-probs is refused instead
(they score it uncut). Row numbers in errors count from 0.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

IGNORE_INDEX = -100
TOKENIZED_COLUMNS = ("prompt_ids", "response_ids", "rewards")
FLOAT32_MAX = torch.finfo(torch.float32).max  # the collator's rewards and ref_logps are float32
TRL_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # pairwise reference log-probs


def load_reward_dataset(path: str) -> Dataset:
    """A JSON/JSONL/parquet file or a ``save_to_disk`` directory (its ``train`` split for a DatasetDict)."""
    if os.path.isdir(path):
        data = load_from_disk(path)
        if isinstance(data, DatasetDict):
            if "train" not in data:
                raise ValueError(f"dataset directory {path} holds splits {list(data)}, none named 'train'")
            data = data["train"]
        return data
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    ext = os.path.splitext(path)[1].lower()
    if ext not in builders:
        raise ValueError(f"dataset {path!r}: expected a .json, .jsonl or .parquet file or a dataset directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    return load_dataset(builders[ext], data_files=path, split="train")


def detect_format(columns) -> str:
    """``"rewards"``, ``"ultrafeedback"`` or ``"pairwise"`` from the column names."""
    cols = set(columns)
    if {"prompt", "responses", "rewards"} <= cols:
        return "rewards"
    if {"prompt", "A0", "score_A0"} <= cols:
        return "ultrafeedback"
    if {"chosen", "rejected"} <= cols:
        return "pairwise"
    raise ValueError(
        f"cannot tell the dataset format from columns {sorted(cols)}: expected (prompt, responses, rewards), "
        "(prompt, A0.., score_A0..) or ([prompt,] chosen, rejected)"
    )


def _ultrafeedback_k(columns) -> int:
    k = 0
    while f"A{k}" in columns and f"score_A{k}" in columns:
        k += 1
    extra = sorted(c for c in columns if re.fullmatch(r"(score_)?A\d+", c) and int(c.rsplit("A", 1)[1]) >= k)
    if extra:
        raise ValueError(f"columns A0..A{k - 1} and score_A0..score_A{k - 1} found, but also unmatched {extra}")
    return k


def _implicit_prompt(idx: int, chosen, rejected) -> tuple:
    """``(prompt, chosen, rejected)``: the prompt is the messages (or text) both responses start with;
    a space ending the shared text goes to the responses, as TRL's ``extract_prompt`` leaves it."""
    chat = _is_messages(chosen) and _is_messages(rejected)
    if chat:
        shared = _turns(chosen), _turns(rejected)
        n = next((i for i, (a, b) in enumerate(zip(*shared)) if a != b), min(map(len, shared)))
    elif isinstance(chosen, str) and isinstance(rejected, str):
        n = len(os.path.commonprefix([chosen, rejected]))
    else:
        raise ValueError(f"row {idx}: without a prompt column, chosen and rejected must both be strings or both "
                         "chat message lists")
    if n == len(chosen) == len(rejected):
        problem = "they are identical"
    elif n == 0:
        problem = "nothing is shared"
    elif n in (len(chosen), len(rejected)):
        problem = "one is all prompt"
    elif chat and {chosen[n]["role"], rejected[n]["role"]} != {"assistant"}:
        problem = "they differ from a turn that is not the assistant's"
    else:
        problem = None
    if problem:
        raise ValueError(f"row {idx}: without a prompt column, chosen and rejected must start with a shared prompt "
                         f"and go on to differ in the assistant's reply ({problem})")
    if not chat and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _row_fields(row: dict, fmt: str, k_cols: int, idx: int) -> tuple:
    """``(prompt, responses, rewards, ref_logps or None)`` of a row; precomputed reference log-probs
    come from a ``ref_logps`` column (K floats), or TRL's ``ref_chosen_logps`` / ``ref_rejected_logps``."""
    ref = row.get("ref_logps")
    if fmt == "rewards":
        return row["prompt"], row["responses"], row["rewards"], ref
    if fmt == "ultrafeedback":
        return (row["prompt"], [row[f"A{i}"] for i in range(k_cols)], [row[f"score_A{i}"] for i in range(k_cols)],
                ref)
    if ref is None and any(c in row for c in TRL_REF_COLUMNS):
        ref = [row.get(c) for c in TRL_REF_COLUMNS]
    if "prompt" in row:
        return row["prompt"], [row["chosen"], row["rejected"]], [1.0, 0.0], ref
    if row["chosen"] is None or row["rejected"] is None:
        return None, [row["chosen"], row["rejected"]], [1.0, 0.0], ref
    prompt, chosen, rejected = _implicit_prompt(idx, row["chosen"], row["rejected"])
    return prompt, [chosen, rejected], [1.0, 0.0], ref


def _k_mismatch(idx: int, n: int, k: int, given: bool) -> ValueError:
    source = "the K setting" if given else "row 0"
    return ValueError(f"row {idx}: has K={n} responses, expected K={k} as {source} has")


def _check_row(idx: int, prompt, responses, rewards, ref_logps, k: int, k_given: bool) -> None:
    if responses is None or rewards is None:
        raise ValueError(f"row {idx}: missing {'responses' if responses is None else 'rewards'}")
    if not isinstance(responses, (list, tuple)) or not isinstance(rewards, (list, tuple)):
        raise ValueError(f"row {idx}: responses and rewards must be lists, got {type(responses).__name__} and "
                         f"{type(rewards).__name__}")
    if any(r is None for r in responses):
        raise ValueError(f"row {idx}: missing response {[i for i, r in enumerate(responses) if r is None]}")
    if prompt is None:  # after the responses: an implicit prompt is missing when one of them is
        raise ValueError(f"row {idx}: missing prompt")
    if isinstance(prompt, (str, list)) and len(prompt) == 0:
        raise ValueError(f"row {idx}: empty prompt")
    if len(responses) != len(rewards):
        raise ValueError(f"row {idx}: {len(responses)} responses but {len(rewards)} rewards")
    if len(responses) < 2:
        raise ValueError(f"row {idx}: needs at least 2 responses, got {len(responses)}")
    if len(responses) != k:
        raise _k_mismatch(idx, len(responses), k, k_given)
    for name, values in (("reward", rewards), ("ref_logps", ref_logps)):
        if values is None:
            continue
        if len(values) != len(responses):
            raise ValueError(f"row {idx}: {len(responses)} responses but {len(values)} {name} values")
        for i, r in enumerate(values):
            if (r is None or isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                    or abs(r) > FLOAT32_MAX):
                raise ValueError(f"row {idx}: {name} {i} is {r!r}, expected a finite number within float32 (a NaN "
                                 "reads as None from parquet)")


def normalize(dataset: Dataset, k: int | None = None) -> tuple[Dataset, str]:
    """Validate every row and map any layout to ``prompt``, ``responses``, ``rewards`` (and
    ``ref_logps`` when the rows carry reference log-probs).

    ``k``: the expected responses per prompt (None: taken from row 0). Returns the dataset and
    its detected format.
    """
    fmt = detect_format(dataset.column_names)
    k_cols = _ultrafeedback_k(dataset.column_names) if fmt == "ultrafeedback" else 0
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows")
    k_given = k is not None
    if k is None:
        k = len(_row_fields(dataset[0], fmt, k_cols, 0)[1] or [])
    trl = [c for c in TRL_REF_COLUMNS if c in dataset.column_names]
    if trl and fmt != "pairwise":
        raise ValueError(f"columns {trl} belong to the pairwise layout; the {fmt} layout takes ref_logps (K numbers)")
    has_ref = "ref_logps" in dataset.column_names or bool(trl)

    def convert(row, idx):
        prompt, responses, rewards, ref = _row_fields(row, fmt, k_cols, idx)
        if has_ref and ref is None:
            raise ValueError(f"row {idx}: missing ref_logps (the dataset has the column)")
        _check_row(idx, prompt, responses, rewards, ref, k, k_given)
        out = {"prompt": prompt, "responses": responses, "rewards": [float(r) for r in rewards]}
        return out if ref is None else {**out, "ref_logps": [float(r) for r in ref]}

    out = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names, desc="Checking rows")
    return out, fmt


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _turns(messages: list[dict]) -> list[tuple]:
    """The (role, content) of each message (a dataset may add other keys, as None, to every message)."""
    return [(m["role"], m["content"]) for m in messages]


def _render(idx: int, prompt, response, tokenizer, chat: bool) -> tuple[str, str]:
    """Prompt and response text: plain strings, or with ``chat`` (any message list in the row) the
    chat template's rendering, which holds its own special tokens."""
    if not chat:
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"row {idx}: prompt and responses must be strings or chat message lists")
        return prompt, response
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"row {idx}: chat messages given but the tokenizer has no chat template")
    p_msgs = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
    r_msgs = response if _is_messages(response) else [{"role": "assistant", "content": response}]
    if _turns(r_msgs[: len(p_msgs)]) == _turns(p_msgs):
        r_msgs = r_msgs[len(p_msgs):]
    if not r_msgs:
        raise ValueError(f"row {idx}: a response holds no message beyond the prompt")
    p_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(p_msgs + r_msgs, tokenize=False)
    if not full.startswith(p_text):
        raise ValueError(f"row {idx}: the chat template does not render the prompt as a prefix of the conversation")
    return p_text, full[len(p_text):]


def _leading_special_tokens(tokenizer) -> list[int]:
    """The ids a tokenizer puts before a text with ``add_special_tokens=True`` (BOS, usually)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    return []


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """A ValueError unless ``0 < max_prompt_length < max_length``."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length} and "
                         f"max_length={max_length}")


def _too_long(idx: int, prompt_ids: list, responses: list, max_length: int, ref_logps) -> bool:
    """Whether a row needs truncation; a ValueError when it carries reference log-probs, which score it uncut."""
    if len(prompt_ids) + max(map(len, responses)) <= max_length:
        return False
    if ref_logps is not None:
        raise ValueError(f"row {idx}: longer than max_length={max_length} tokens, so it would be cut, but its "
                         "precomputed ref_logps score it uncut: raise max_length, or drop the ref_logps column to "
                         "have them computed on the cut row")
    return True


def _truncate(prompt_ids: list, responses: list, lead: list, max_length: int, max_prompt_length: int) -> tuple:
    """A too long row's ``(prompt_ids, responses)`` within ``max_length`` (module doc); the tokenizer's
    leading tokens ``lead`` are kept where they fit."""
    head = len(lead) if prompt_ids[: len(lead)] == lead and len(lead) < max_prompt_length else 0
    prompt_ids = prompt_ids[:head] + prompt_ids[head:][-(max_prompt_length - head):]
    return prompt_ids, [r[: max_length - len(prompt_ids)] for r in responses]


def tokenize(dataset: Dataset, tokenizer, max_length: int, max_prompt_length: int) -> Dataset:
    """Token ids per row: ``prompt_ids``, ``response_ids`` (K lists), ``rewards``; see the module doc."""
    check_lengths(max_length, max_prompt_length)
    eos = tokenizer.eos_token_id
    lead = _leading_special_tokens(tokenizer)

    def encode(row, idx):
        prompt_ids, responses = None, []
        chat = _is_messages(row["prompt"]) or any(_is_messages(r) for r in row["responses"])
        for response in row["responses"]:
            p_text, r_text = _render(idx, row["prompt"], response, tokenizer, chat)
            if prompt_ids is None:  # the tokenizer's leading tokens (BOS) only: never an EOS after the prompt
                prompt_ids = (lead if not chat else []) + tokenizer(p_text, add_special_tokens=False)["input_ids"]
                if not prompt_ids:  # nothing would predict the first response token
                    raise ValueError(f"row {idx}: the prompt has no tokens (and the tokenizer adds no BOS)")
            ids = tokenizer(r_text, add_special_tokens=False)["input_ids"]
            if not chat and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            if not ids:  # its log-prob would be 0: probability one, whatever the model
                raise ValueError(f"row {idx}: response {len(responses)} has no tokens (empty, and no EOS to end it)")
            responses.append(ids)
        if _too_long(idx, prompt_ids, responses, max_length, row.get("ref_logps")):
            prompt_ids, responses = _truncate(prompt_ids, responses, lead, max_length, max_prompt_length)
        out = {"prompt_ids": prompt_ids, "response_ids": responses, "rewards": row["rewards"]}
        return {**out, "ref_logps": row["ref_logps"]} if "ref_logps" in row else out

    return dataset.map(encode, with_indices=True, remove_columns=dataset.column_names, desc="Tokenizing")


def prepare_dataset(dataset: Dataset, tokenizer, max_length: int, max_prompt_length: int,
                    k: int | None = None) -> tuple[Dataset, str]:
    """Validate and tokenise a dataset in any accepted layout; a tokenised one is checked row by row.

    Returns the dataset (``prompt_ids``, ``response_ids``, ``rewards`` and ``ref_logps`` when
    present) and its format (``"tokenized"`` for an already tokenised one).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__} (pick a split of a DatasetDict; "
                        "an IterableDataset has no length for the reference pass)")
    if set(TOKENIZED_COLUMNS) <= set(dataset.column_names):
        return _check_tokenized(dataset, tokenizer, max_length, max_prompt_length, k), "tokenized"
    rows, fmt = normalize(dataset, k)
    return tokenize(rows, tokenizer, max_length, max_prompt_length), fmt


def _check_tokenized(dataset: Dataset, tokenizer, max_length: int, max_prompt_length: int, k: int | None) -> Dataset:
    """A tokenised dataset with every row checked (token ids within the tokenizer's vocabulary) and truncated."""
    check_lengths(max_length, max_prompt_length)
    k_given = k is not None
    k = k if k_given else len(dataset[0]["response_ids"])
    vocab = len(tokenizer)
    refs = dataset["ref_logps"] if "ref_logps" in dataset.column_names else None
    too_long = False
    for idx, row in enumerate(zip(dataset["prompt_ids"], dataset["response_ids"], dataset["rewards"])):
        _check_row(idx, *row, None if refs is None else refs[idx], k, k_given)
        prompt_ids, responses = row[:2]
        if not all(responses):
            raise ValueError(f"row {idx}: response {[len(r) for r in responses].index(0)} has no tokens")
        for name, ids in (("prompt_ids", prompt_ids), *((f"response_ids {i}", r) for i, r in enumerate(responses))):
            ends = (None,) if None in ids else (min(ids), max(ids))
            for t in ends:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(f"row {idx}: {name} holds {t!r}, not a token id of the tokenizer (0 to "
                                     f"{vocab - 1})")
        too_long |= _too_long(idx, prompt_ids, responses, max_length, None if refs is None else refs[idx])
    if not too_long:
        return dataset
    lead = _leading_special_tokens(tokenizer)

    def cut(row, idx):
        prompt_ids, responses = row["prompt_ids"], row["response_ids"]
        if _too_long(idx, prompt_ids, responses, max_length, None):
            prompt_ids, responses = _truncate(prompt_ids, responses, lead, max_length, max_prompt_length)
        return {"prompt_ids": prompt_ids, "response_ids": responses}

    return dataset.map(cut, with_indices=True, desc="Truncating")


@dataclass
class NCACollator:
    """Batches rows into ``B*K`` right-padded sequences, the K responses of a prompt contiguous.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``(B*K, T)`` (labels equal input_ids on
    response tokens, ``ignore_index`` on prompt and padding; not yet shifted), ``rewards``
    ``(B, K)`` and, when the rows carry them, ``ref_logps`` ``(B, K)``.
    """

    pad_token_id: int
    ignore_index: int = IGNORE_INDEX

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for f in features:
            for r in f["response_ids"]:
                seqs.append(torch.tensor(f["prompt_ids"] + r, dtype=torch.long))
                labels.append(torch.tensor([self.ignore_index] * len(f["prompt_ids"]) + r, dtype=torch.long))
        pad = torch.nn.utils.rnn.pad_sequence
        input_ids = pad(seqs, batch_first=True, padding_value=self.pad_token_id)
        mask = pad([torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0)
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": pad(labels, batch_first=True, padding_value=self.ignore_index),
            "rewards": torch.tensor([f["rewards"] for f in features], dtype=torch.float32),
        }
        if all("ref_logps" in f for f in features):
            batch["ref_logps"] = torch.tensor([f["ref_logps"] for f in features], dtype=torch.float32)
        return batch
