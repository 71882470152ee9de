"""The data pipeline: loading, chat-template rendering with prompt masking, mixing, the suite."""

import json

import pytest

from cpift_dist.cli import main
from cpift_dist.data import (IGNORE_INDEX, TASKS, TaskMixture, encode, encode_all, load_records,
                             make_suite, score)
from cpift_dist.errors import CpiftError
from helpers import make_chat_tokenizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite") / "suite"
    make_suite(d, n_train=64, n_eval=16, seed=3)
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("tok") / "tok"
    make_chat_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)  # saved and loaded like a real checkpoint's


def test_prompt_tokens_are_masked_token_by_token(suite, tok):
    conv = load_records(suite / "arithmetic" / "train.jsonl")[0]
    e = encode(tok, conv, max_length=512)
    prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(conv, tokenize=False)
    n_prompt = len(prompt)  # one token per character, special tokens aside
    n_prompt -= prompt.count("<|im_start|>") * (len("<|im_start|>") - 1)
    n_prompt -= prompt.count("<|im_end|>") * (len("<|im_end|>") - 1)
    assert len(e.input_ids) == len(e.labels)
    for i, (ids, lab) in enumerate(zip(e.input_ids, e.labels)):
        if i < n_prompt:
            assert lab == IGNORE_INDEX, i
        else:
            assert lab == ids, i
    supervised = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX])
    assert supervised == conv[-1]["content"] + "<|im_end|>\n"
    assert tok.decode(e.input_ids) == full


def test_multi_turn_supervises_only_the_last_answer_and_truncation_policy(suite, tok):
    conv = load_records(suite / "format" / "train.jsonl")[0]
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    e = encode(tok, conv, max_length=4096)
    first = e.labels.index(next(lab for lab in e.labels if lab != IGNORE_INDEX))
    assert tok.decode(e.input_ids[first:]) == conv[-1]["content"] + "<|im_end|>\n"
    # longer than max_length: the end of the response is cut
    cut = encode(tok, conv, max_length=first + 3)
    assert len(cut.input_ids) == first + 3 and cut.labels[-3:] == cut.input_ids[-3:]
    # the prompt alone fills max_length: dropped
    assert encode(tok, conv, max_length=first) is None
    kept, dropped = encode_all(tok, [conv, conv], first + 3, "x")
    assert len(kept) == 2 and dropped == 0


def test_formats_and_column_mapping(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for ext in ("jsonl", "json", "parquet"):
        conv = load_records(tmp_path / f"d.{ext}", columns={"q": "instruction", "a": "output"})
        assert conv[3] == [{"role": "user", "content": "question 3"},
                           {"role": "assistant", "content": "answer 3"}]


def test_bad_data_is_a_clear_error(tmp_path, tok):
    with pytest.raises(CpiftError, match="nope.jsonl: task data file does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "output": "b"}\n')
    with pytest.raises(CpiftError, match=r"x.jsonl: records have no field 'instruction'"):
        load_records(tmp_path / "x.jsonl")
    with pytest.raises(CpiftError, match="mapped column 'question'"):
        load_records(tmp_path / "x.jsonl", columns={"question": "instruction"})
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(CpiftError, match="e.jsonl: (the dataset is empty|cannot read)"):
        load_records(tmp_path / "e.jsonl")
    (tmp_path / "m.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(CpiftError, match="ending with an assistant turn"):
        load_records(tmp_path / "m.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": \n')
    with pytest.raises(CpiftError, match="bad.jsonl: cannot read task data"):
        load_records(tmp_path / "bad.jsonl")
    plain = make_chat_tokenizer(chat_template=None)
    with pytest.raises(CpiftError, match="tok: the tokenizer has no chat template"):
        encode_all(plain, [[{"role": "user", "content": "a"},
                            {"role": "assistant", "content": "b"}]], 64, "tok")


def test_mixture_is_deterministic_balanced_resumable_and_sharded():
    sizes = {"a": 10, "b": 3, "c": 7}
    m1 = TaskMixture(sizes, samples={"a": 8, "b": 8, "c": 8}, seed=5)
    seq = m1.take(60)
    assert seq == TaskMixture(sizes, samples={"a": 8, "b": 8, "c": 8}, seed=5).take(60)
    first_epoch = seq[:24]
    assert sorted(t for t, _ in first_epoch) == ["a"] * 8 + ["b"] * 8 + ["c"] * 8
    assert all(0 <= i < sizes[t] for t, i in seq)
    # resume from a saved state continues exactly
    m2 = TaskMixture(sizes, samples={"a": 8, "b": 8, "c": 8}, seed=5)
    m2.take(17)
    state = json.loads(json.dumps(m2.state_dict()))
    m3 = TaskMixture(sizes, samples={"a": 8, "b": 8, "c": 8}, seed=5)
    m3.load_state_dict(state)
    assert m3.take(43) == seq[17:]
    # ranks partition the global sequence
    r0 = TaskMixture(sizes, seed=1).take(20, rank=0, world_size=2)
    r1 = TaskMixture(sizes, seed=1).take(20, rank=1, world_size=2)
    whole = TaskMixture(sizes, seed=1).take(20)
    assert r0 == whole[0::2] and r1 == whole[1::2]
    with pytest.raises(ValueError):
        TaskMixture(sizes, seed=2).load_state_dict(state)


def test_suite_is_seeded_split_and_scored(suite, tmp_path):
    meta = json.loads((suite / "suite.json").read_text())
    assert set(meta["tasks"]) == set(TASKS) and len(TASKS) >= 4
    make_suite(tmp_path / "again", n_train=64, n_eval=16, seed=3)
    for task in TASKS:
        for split, n in (("train", 64), ("eval", 16)):
            f = suite / task / f"{split}.jsonl"
            assert f.read_bytes() == (tmp_path / "again" / task / f"{split}.jsonl").read_bytes()
            assert len(f.read_text().splitlines()) == n
        train = [json.loads(x) for x in (suite / task / "train.jsonl").read_text().splitlines()]
        held = [json.loads(x) for x in (suite / task / "eval.jsonl").read_text().splitlines()]
        prompts = {json.dumps(ex.get("messages", [ex.get("instruction"), ex.get("input")])[:2])
                   for ex in train}
        assert sum(json.dumps(ex.get("messages", [ex.get("instruction"), ex.get("input")])[:2])
                   in prompts for ex in held) <= len(held) // 4
        for ex in train + held:  # the reference answer scores 1, a wrong one 0
            ref = ex["messages"][-1]["content"] if "messages" in ex else ex["output"]
            assert score(task, ref, ex) == 1.0, (task, ex)
            wrong = (str(int(ref) + 1) if task == "arithmetic" else "Z" if task == "logic"
                     else ref + " x")
            assert score(task, wrong, ex) == 0.0, (task, ex)
        assert load_records(suite / task / "eval.jsonl")  # loads in its shape
    assert score("arithmetic", "The answer is 15.", {"answer": 15}) == 1.0


def test_make_suite_cli(tmp_path, capsys):
    assert main(["data", "make-suite", "--out", str(tmp_path / "s"), "--n-train", "8",
                 "--n-eval", "4"]) == 0
    assert "arithmetic" in capsys.readouterr().out
    assert main(["data", "make-suite", "--out", str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err
