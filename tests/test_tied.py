"""Tied input/output embeddings: a checkpoint that stores ``lm_head.weight`` beside a tied
``model.embed_tokens.weight`` is one parameter for the analysis, the fuser and the masked SFT.

Oracle: the same models saved without the stored copy. Masks and fused tensors must be
byte-identical between the two, the output must stay tied, and stored copies that differ are
refused with one line naming both tensors.
"""

import json
import shutil
import sys

import pytest
import torch

from cpift_dist.analysis import analyze
from cpift_dist.analysis.masks import MaskFile
from cpift_dist.config import AnalysisConfig, FusionConfig
from cpift_dist.errors import CheckpointError
from cpift_dist.fusion import fuse
from cpift_dist.io import Checkpoint
from helpers import make_tied, oracle_masks, perturb, run

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tied(request, tmp_path_factory):
    """{stored: {base, a, b}, plain: {base, a, b}}: the same tied model and tuned variants,
    with and without a stored ``lm_head.weight`` copy."""
    d = tmp_path_factory.mktemp(f"tied-{request.param}")
    out = {}
    for variant, store in (("stored", True), ("plain", False)):
        base = make_tied(d / variant / "base", request.param, store_head=store)
        out[variant] = {"base": base,
                        "a": perturb(base, d / variant / "a", seed=1),
                        "b": perturb(base, d / variant / "b", seed=2, density=0.3)}
    return request.param, out


def test_a_stored_tied_copy_is_one_parameter(tied):
    kind, m = tied
    s, p = Checkpoint(m["stored"]["base"]), Checkpoint(m["plain"]["base"])
    assert s.tied == {HEAD: EMBED} and p.tied == {}
    assert HEAD in s.stored_names() and HEAD not in s.names() and s.names() == p.names()
    assert kind != "qwen2" or "model.layers.0.self_attn.q_proj.bias" in s.names()
    assert Checkpoint(m["stored"]["a"]).tied == {HEAD: EMBED}


@pytest.mark.timeout(240)
def test_analysis_counts_the_tied_matrix_once(tied, tmp_path):
    _, m = tied
    res = {}
    for variant in ("stored", "plain"):
        res[variant] = analyze(m[variant]["base"], {"a": m[variant]["a"], "b": m[variant]["b"]},
                               tmp_path / variant, AnalysisConfig(p=0.05), progress=False)
    ck = Checkpoint(m["plain"]["base"])
    d = sum(ck.info(n).numel for n in ck.names())
    assert res["stored"].stats["a"]["D"] == res["plain"].stats["a"]["D"] == d
    assert res["stored"].overlap == res["plain"].overlap
    for t in ("a", "b"):
        ms, mp = (MaskFile(tmp_path / v / "masks" / f"{t}.safetensors")
                  for v in ("stored", "plain"))
        assert ms.names() == mp.names() and HEAD not in ms.names()
        oracle = oracle_masks(m["plain"]["base"], m["plain"][t], 0.05)
        for n in ms.names():
            assert bytes(ms.read_packed(n)) == bytes(mp.read_packed(n)), n
            assert torch.equal(ms.read(n), oracle[n]), n


@pytest.mark.timeout(300)
def test_fusion_keeps_the_output_tied(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    _, m = tied
    outs = {}
    for variant in ("stored", "plain"):
        analyze(m[variant]["base"], {"a": m[variant]["a"], "b": m[variant]["b"]},
                tmp_path / variant / "an", AnalysisConfig(p=0.05), progress=False)
        outs[variant] = tmp_path / variant / "fused"
        fuse(m[variant]["base"], {"a": m[variant]["a"], "b": m[variant]["b"]},
             tmp_path / variant / "an" / "masks", outs[variant],
             FusionConfig(max_shard_bytes=20_000, device="cpu"), progress=False)
    s, p = Checkpoint(outs["stored"]), Checkpoint(outs["plain"])
    assert s.tied == {HEAD: EMBED} and HEAD not in p.stored_names()
    assert s.names() == p.names()
    for n in s.names():
        assert torch.equal(s.read(n), p.read(n)), n
    assert torch.equal(s.read(HEAD), s.read(EMBED))  # one fused value, written twice
    s.check_tied()
    man = json.loads((outs["stored"] / "manifest.json").read_text())
    assert HEAD not in man["per_tensor"] and EMBED in man["per_tensor"]
    ids = torch.arange(20).reshape(2, 10)
    logits = {}
    for variant, path in outs.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            logits[variant] = model(ids).logits
    assert torch.equal(logits["stored"], logits["plain"])


def test_a_tied_model_fine_tuned_in_fp32_stays_tied_in_float32(tmp_path):
    """A bf16 tied base (head stored) with an fp32 fine-tune that stores only the embedding and
    a bf16 one that stores both: masks equal the float32 oracle, and the fused embedding and
    its stored copy are both float32, one value written twice (the copy's dtype follows its
    parameter's)."""
    base = make_tied(tmp_path / "base", store_head=True, dtype=torch.bfloat16)
    src = make_tied(tmp_path / "src", store_head=False, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    fp32 = perturb(src, tmp_path / "fp32", seed=1, shard_bytes=8_000,
                   edit=lambda n, t: t.float() + 1e-4 * torch.randn(t.shape, generator=g))
    bf16 = perturb(base, tmp_path / "bf16", seed=2, shard_bytes=8_000)  # a file per copy
    tuned = {"a": fp32, "b": bf16}
    assert Checkpoint(fp32).tied == {} and Checkpoint(bf16).tied == {HEAD: EMBED}
    analyze(base, tuned, tmp_path / "an", AnalysisConfig(p=0.05), progress=False)
    for t, path in tuned.items():
        mf = MaskFile(tmp_path / "an" / "masks" / f"{t}.safetensors")
        for n, want in oracle_masks(base, path, 0.05).items():
            assert torch.equal(mf.read(n), want), (t, n)
    fuse(base, tuned, tmp_path / "an" / "masks", tmp_path / "fused",
         FusionConfig(max_shard_bytes=20_000, device="cpu"), progress=False)
    out = Checkpoint(tmp_path / "fused")
    assert out.tied == {HEAD: EMBED}
    assert {out.info(n).dtype for n in out.stored_names()} == {torch.float32}
    assert torch.equal(out.read(HEAD), out.read(EMBED))
    out.check_tied()
    # through the command line, written in the base's dtype: still one value written twice,
    # the float32 output's rounded
    r = run([sys.executable, "-m", "cpift_dist.cli", "fuse", "--no-ray", "--quiet",
             "--base", str(base), "--tuned", f"a={fp32}", "--tuned", f"b={bf16}",
             "--masks", str(tmp_path / "an" / "masks"), "--out", str(tmp_path / "narrow"),
             "--widened-dtype", "base", "--device", "cpu", "fusion.max_shard_bytes=20000"], 120)
    assert r.returncode == 0, r.stderr[-2000:]
    narrow = Checkpoint(tmp_path / "narrow")
    assert narrow.tied == {HEAD: EMBED}
    assert {narrow.info(n).dtype for n in narrow.stored_names()} == {torch.bfloat16}
    for n in out.stored_names():
        assert torch.equal(narrow.read(n), out.read(n).bfloat16()), n
    narrow.check_tied()


def test_tied_copies_that_differ_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = make_tied(tmp_path / "base", "qwen2")
    tuned = perturb(base, tmp_path / "a", seed=1)
    files = sorted(tuned.glob("*.safetensors"))
    for f in files:  # plant a differing head in the tuned model's shard that holds it
        sd = load_file(str(f))
        if HEAD in sd:
            sd[HEAD] = sd[HEAD].clone()
            sd[HEAD].view(-1)[5] += 1.0
            save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tied tensors differ: 'lm_head.weight' .* "
                                              r"'model.embed_tokens.weight'"):
        analyze(base, {"a": tuned}, tmp_path / "out", AnalysisConfig(p=0.05), progress=False)
    assert not (tmp_path / "out").exists()
    r = run([sys.executable, "-m", "cpift_dist.cli", "fuse", "--no-ray", "--quiet",
             "--base", str(base), "--tuned", f"a={tuned}", "--masks", str(tmp_path / "m"),
             "--out", str(tmp_path / "fused")], 120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "tied tensors differ" in lines[0] and "lm_head.weight" in lines[0]
    assert not (tmp_path / "fused").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_masked_stage_freezes_the_tied_embedding(train_setup, tmp_path):
    """2 gloo ranks, ZeRO-3: a tied Qwen2 that stores its head, with a core mask over part of
    the embedding (the mask has no entry for the head): the frozen embedding elements are
    bit-identical afterwards, the rest trains, the head follows the embedding."""
    from transformers import AutoModelForCausalLM

    from helpers import make_chat_tokenizer, torchrun_train, write_mask

    setup = tmp_path / "setup"
    make_tied(setup / "model", "qwen2", store_head=True)
    make_chat_tokenizer(setup / "model")
    (setup / "suite").symlink_to(train_setup / "suite")
    g = torch.Generator().manual_seed(0)
    union = write_mask(tmp_path / "core.safetensors", setup / "model",
                       lambda n, k: torch.rand(k, generator=g) < (0.3 if n == EMBED else 0.05))
    assert HEAD not in union
    r = torchrun_train(setup, tmp_path / "o", ("arithmetic", "strings"), "zero_stage=3",
                       "weight_decay=0.05", "max_steps=3", "save_every=3",
                       freeze=[tmp_path / "core.safetensors"], timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    base, got = Checkpoint(setup / "model"), Checkpoint(tmp_path / "o" / "model")
    for n in base.names():
        b, t, msk = base.read(n).reshape(-1), got.read(n).reshape(-1), union[n]
        assert torch.equal(b[msk], t[msk]), n
        if n == EMBED:
            assert not torch.equal(b[~msk], t[~msk])  # the rest of the embedding trained
    facts = json.loads((tmp_path / "o" / "freeze.json").read_text())
    assert facts["frozen"] == facts["checked"] == facts["frozen_in_partitions"] == sum(
        int(x.sum()) for x in union.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    shutil.rmtree(tmp_path / "o" / "checkpoints", ignore_errors=True)
