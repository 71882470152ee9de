"""The DeepSpeed loop with 2 real gloo ranks (torchrun): ZeRO-3 and ZeRO-2, crash and resume."""

import json
import os
import pickle
import shutil

import pytest
import torch

from cpift_dist.io import Checkpoint
from helpers import torchrun_train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def setup(train_setup):
    return train_setup



def train(setup, out, *overrides, env=None):
    return torchrun_train(setup, out, ("arithmetic", "logic"), "weight_decay=0.01", *overrides,
                          env=env)


class _Planted:
    """Unpickling this runs ``touch marker``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage,dtype", [(3, "fp32"), (2, "fp32"), (3, "bf16")])
def test_two_ranks_lower_the_loss_and_export_loads(setup, tmp_path, stage, dtype):
    r = train(setup, tmp_path / "o", f"zero_stage={stage}", f"dtype={dtype}", "max_steps=16",
              "save_every=8", "grad_accum=2")
    assert r.returncode == 0, r.stderr[-4000:]
    ls = losses(tmp_path / "o")
    assert len(ls) == 16 and sum(ls[-4:]) / 4 < sum(ls[:4]) / 4 - 0.5, ls
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "o" / "model")
    assert tok.chat_template
    base = Checkpoint(setup / "model")
    out = Checkpoint(tmp_path / "o" / "model")
    assert out.names() == base.names()
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert {out.info(n).dtype for n in out.names()} == {want}
    changed = [n for n in base.names()
               if not torch.equal(out.read(n).float(), base.read(n).to(want).float())]
    assert len(changed) == len(base.names())  # every tensor trained
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3,
                          min_new_tokens=3).shape == (1, 6)
    assert list((tmp_path / "o" / "tensorboard").glob("events.out.tfevents.*"))


def test_crash_after_checkpoint_then_resume_equals_uninterrupted(setup, tmp_path):
    args = ("zero_stage=3", "max_steps=9", "save_every=3")
    r = train(setup, tmp_path / "full", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    r = train(setup, tmp_path / "crash", *args, env={"CPIFT_FAULT_AFTER_STEP": "6"})
    assert r.returncode != 0  # both ranks died right after step 6's checkpoint
    assert len(losses(tmp_path / "crash")) == 6 and not (tmp_path / "crash" / "model").exists()
    # a pickle planted in a copy's checkpoint is refused on resume, and its code never runs
    shutil.copytree(tmp_path / "crash", tmp_path / "planted")
    marker = tmp_path / "pwned"
    targets = list((tmp_path / "planted" / "checkpoints" / "step-6").glob("*model_states.pt"))
    assert len(targets) == 2  # one per rank (ZeRO-3)
    for f in targets:
        f.write_bytes(pickle.dumps(_Planted(marker)))
    r = train(setup, tmp_path / "planted", *args)
    assert r.returncode != 0 and "refusing to resume from a checkpoint" in r.stderr, \
        r.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "planted" / "model").exists()
    r = train(setup, tmp_path / "crash", *args)  # the same command resumes
    assert r.returncode == 0, r.stderr[-4000:]
    assert losses(tmp_path / "crash") == losses(tmp_path / "full")
    a, b = Checkpoint(tmp_path / "full" / "model"), Checkpoint(tmp_path / "crash" / "model")
    for n in a.names():
        assert torch.equal(a.read(n), b.read(n)), n
    # SIGTERM to rank 0 alone during step 4 (a preemption; between the checkpoints of steps 3
    # and 6): both ranks agree on it, save step 4's checkpoint and stop; the same command
    # resumes from step 4 to the uninterrupted run's losses and weights
    from cpift_dist.training.loop import SIGNAL_ENV

    term = tmp_path / "term"
    r = train(setup, term, *args, env={SIGNAL_ENV: "4"})
    assert r.returncode != 0 and "exitcode  : 143" in r.stderr, r.stderr[-4000:]
    assert (f"cpift-train: stopped by SIGTERM after step 4: its checkpoint is in "
            f"{term / 'checkpoints' / 'step-4'}") in r.stderr, r.stderr[-4000:]
    assert (term / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert len(losses(term)) == 4 and not (term / "model").exists()
    r = train(setup, term, *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert losses(term) == losses(tmp_path / "full")
    b = Checkpoint(term / "model")
    for n in a.names():
        assert torch.equal(a.read(n), b.read(n)), n


@pytest.mark.parametrize("kind,dtype,shard", [("untied", "fp32", "2GB"),
                                              ("qwen2", "bf16", "20KB")])
def test_the_streamed_zero3_export_equals_the_gathered_one(setup, tmp_path, kind, dtype,
                                                           shard):
    """ZeRO-3 exports stream (each parameter gathered in turn, rank 0 checking its frozen
    elements and writing it): against the whole state dict gathered and written by
    ``save_pretrained`` (the worker exports both), the same tensors bit for bit, the same
    config files, the same freeze report; a tied model stays tied (its head not written);
    several shards with an index where ``max_shard_size`` asks. 2 gloo ranks, a core mask."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from helpers import make_chat_tokenizer, make_tied, write_mask

    if kind != "untied":
        tied = tmp_path / "setup"
        make_tied(tied / "model", kind, store_head=True)
        make_chat_tokenizer(tied / "model")
        (tied / "suite").symlink_to(setup / "suite")
        setup = tied
    g = torch.Generator().manual_seed(0)
    write_mask(tmp_path / "core.safetensors", setup / "model",
               lambda n, k: torch.rand(k, generator=g) < 0.1)
    worker = str(Path(__file__).parent / "export_worker.py")
    r = torchrun_train(setup, tmp_path / "o", ("arithmetic", "logic"), "zero_stage=3",
                       f"dtype={dtype}", "max_steps=2", "save_every=2", f"max_shard_size={shard}",
                       freeze=[tmp_path / "core.safetensors"], entry=(worker,), timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    streamed, gathered = tmp_path / "o" / "streamed", tmp_path / "o" / "model"
    assert [json.loads((d / "manifest.json").read_text())["export"]
            for d in (streamed, gathered)] == ["streamed", "gathered"]
    a, b = Checkpoint(streamed), Checkpoint(gathered)
    assert a.stored_names() == b.stored_names() and a.names() == b.names()
    assert all(torch.equal(a.read(n).view(torch.uint8), b.read(n).view(torch.uint8))
               for n in a.stored_names())
    for f in ("config.json", "generation_config.json"):
        assert json.loads((streamed / f).read_text()) == json.loads((gathered / f).read_text())
    facts = [json.loads(p.read_text()) for p in (streamed / "freeze.json",
                                                 tmp_path / "o" / "freeze.json")]
    assert facts[0] == facts[1] and facts[0]["checked"] == facts[0]["frozen"] > 0
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert (len(shards) > 1) == (shard == "20KB") and (
        (streamed / "model.safetensors.index.json").exists() == (len(shards) > 1))
    model = AutoModelForCausalLM.from_pretrained(streamed)
    if kind != "untied":
        assert "lm_head.weight" not in a.stored_names()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    shutil.rmtree(tmp_path / "o" / "checkpoints", ignore_errors=True)


def test_the_export_streams_only_where_transformers_writes_the_names_it_holds(tmp_path):
    """The streamed export writes the model's own names (a tied head dropped): exactly what
    ``save_pretrained`` writes for a tied Llama; a Mixtral, whose fused experts transformers 5
    splits back into per-expert tensors on save, is gathered whole and written by
    ``save_pretrained`` instead."""
    from types import SimpleNamespace

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from cpift_dist.training.loop import SFTLoop
    from helpers import make_tied

    def keys(model):
        return SFTLoop._streamed_keys(SimpleNamespace(engine=SimpleNamespace(module=model)))

    tied = AutoModelForCausalLM.from_pretrained(make_tied(tmp_path / "tied", store_head=False))
    tied.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    assert "lm_head.weight" not in written and set(keys(tied)) == written
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
        num_experts_per_tok=1))
    moe.save_pretrained(tmp_path / "moe")
    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) != set(moe.state_dict())  # the per-expert names on disk
    assert keys(moe) is None
