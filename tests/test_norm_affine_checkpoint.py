"""``normfold.fold_norm_affine_checkpoint``: the norm-affine fold of a sharded safetensors
checkpoint, planned on a meta-device instance, written shard by shard. Every folded tensor must be
bit-equal to the in-memory :func:`normfold.fold_norm_affine` on the same weights; the records and
codes the same; the index right; the files safe (no overwrite, nothing partial)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llama_like import LlamaLike, realistic_, save_sharded
from norm_blocks import GPT2MLP, BertHead, D, LNIntoBiasFree
from safetensors import safe_open
from torch import nn

import normfold
import normfold.norm_affine_checkpoint as nac
from normfold.errors import ConsistencyError, LoadError, ParityError, UsageError

IDS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
X = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def _checkpoint(
    model: nn.Module, folder: Path, shard_bytes: int = 12_000, drop: tuple[str, ...] = ()
) -> Path:
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    save_sharded(state, folder, shard_bytes)
    return folder


def _meta(factory, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return factory(*args, **kwargs)


def _read_out(folder: Path) -> dict[str, torch.Tensor]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
    else:
        with safe_open(folder / "model.safetensors", "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    out = {}
    for name, shard in weight_map.items():
        with safe_open(folder / shard, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _same_as_in_memory(
    result, memory, folder: Path, tied_back: frozenset[str] | set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The output holds exactly the in-memory fold's state (less ``tied_back``, the names a tied
    config ties back on load), each tensor bit-equal; the same records."""
    written = _read_out(folder)
    state = memory.model.state_dict()
    assert set(written) == set(state) - tied_back
    for name, t in written.items():
        assert t.dtype == state[name].dtype and torch.equal(t, state[name]), name
    assert [(f.norm, f.into, f.code, f.new_biases, f.untied) for f in result.folded] == [
        (f.norm, f.into, f.code, f.new_biases, f.untied) for f in memory.folded]  # fmt: skip
    records = [(k.norm, k.code, k.reason) for k in memory.kept]
    assert [(k.norm, k.code, k.reason) for k in result.kept] == records
    return written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sharded_llama_like_checkpoint_folds_bit_equal_to_the_in_memory_fold(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    model = realistic_(LlamaLike(), 1).eval().to(dtype)
    src = _checkpoint(model, tmp_path / "in", shard_bytes=12_000 if dtype == torch.float32 else 6_000)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) >= 3
    result = normfold.fold_norm_affine_checkpoint(_meta(LlamaLike).to(dtype), IDS, src, tmp_path / "out")
    memory = normfold.fold_norm_affine(model, IDS)
    written = _same_as_in_memory(result, memory, tmp_path / "out")
    assert len(result.folded) == 5 and result.passed and set(result.proofs) == {f.norm for f in result.folded}
    assert not torch.equal(written["layers.0.q_proj.weight"], model.state_dict()["layers.0.q_proj.weight"])
    # the same shards, each with its tensors in its input's order; the index names them
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    for shard in shards:
        with safe_open(src / shard, "pt") as a, safe_open(tmp_path / "out" / shard, "pt") as b:
            assert list(a.keys()) == list(b.keys())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    source = json.loads((src / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert {p.name for p in result.files} == {*shards, "model.safetensors.index.json"}
    assert result.parameter_bytes == index["metadata"]["total_size"]


def test_a_tied_head_is_refused_then_untied_with_its_config(tmp_path: Path) -> None:
    model = realistic_(LlamaLike(tied=True), 2).eval()
    src = _checkpoint(model, tmp_path / "in", drop=("lm_head.weight",))  # as save_pretrained writes it
    (src / "config.json").write_text(json.dumps({"model_type": "x", "tie_word_embeddings": True}))
    (src / "tokenizer.json").write_text("{}")
    meta = _meta(LlamaLike, tied=True)
    kept = normfold.fold_norm_affine_checkpoint(meta, IDS, src, tmp_path / "a")
    _same_as_in_memory(kept, normfold.fold_norm_affine(model, IDS), tmp_path / "a", {"lm_head.weight"})
    assert [(k.norm, k.code) for k in kept.kept] == [("norm", "tied_weight")]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["tie_word_embeddings"] is True
    untied = normfold.fold_norm_affine_checkpoint(meta, IDS, src, tmp_path / "b", untie=True)
    written = _same_as_in_memory(untied, normfold.fold_norm_affine(model, IDS, untie=True), tmp_path / "b")
    assert "lm_head.weight" in written and untied.folded[-1].untied == ("lm_head.weight",)
    assert torch.equal(written["embed_tokens.weight"], model.embed_tokens.weight)  # never centred or scaled
    assert json.loads((tmp_path / "b" / "config.json").read_text())["tie_word_embeddings"] is False
    assert (tmp_path / "b" / "tokenizer.json").read_text() == "{}"
    assert any("tie_word_embeddings set to false" in n for n in untied.notes)


@pytest.mark.parametrize("new_biases", [False, True])
def test_a_layer_norm_shift_stays_or_becomes_a_new_bias(tmp_path: Path, new_biases: bool) -> None:
    model = LNIntoBiasFree().eval()
    src = _checkpoint(model, tmp_path / "in", shard_bytes=10**9)  # one model.safetensors, no index
    result = normfold.fold_norm_affine_checkpoint(_meta(LNIntoBiasFree), X, src, tmp_path / "out",
                                                  new_biases=new_biases)  # fmt: skip
    written = _same_as_in_memory(result, normfold.fold_norm_affine(model, X, new_biases=new_biases),
                                 tmp_path / "out")  # fmt: skip
    assert ("proj.bias" in written) is new_biases
    assert result.folded[0].code == (None if new_biases else "new_bias_needed")
    assert [p.name for p in result.files] == ["model.safetensors"]


def test_gpt2_conv1d_in_out_weights(tmp_path: Path) -> None:
    model = GPT2MLP().eval()
    src = _checkpoint(model, tmp_path / "in", shard_bytes=2_000)
    result = normfold.fold_norm_affine_checkpoint(_meta(GPT2MLP), X, src, tmp_path / "out")
    _same_as_in_memory(result, normfold.fold_norm_affine(model, X), tmp_path / "out")
    assert result.folded[0].into == ("c_fc.weight",)


def test_a_float16_fold_that_would_overflow_is_kept_with_the_in_memory_reason(tmp_path: Path) -> None:
    model = LNIntoBiasFree().eval()
    with torch.no_grad():
        model.proj.weight[0, 3] = 6e4
        model.ln.weight[3] = 1.3
    model = model.half()
    src = _checkpoint(model, tmp_path / "in")
    meta = _meta(LNIntoBiasFree).half()
    result = normfold.fold_norm_affine_checkpoint(meta, X.half(), src, tmp_path / "out")
    memory = normfold.fold_norm_affine(model, X.half())
    _same_as_in_memory(result, memory, tmp_path / "out")
    assert [(k.code, k.reason) for k in result.kept] == [
        ("overflow", "folding ln makes proj.weight (max |value| 77988.3, torch.float16) overflow")
    ]  # fmt: skip
    assert torch.equal(_read_out(tmp_path / "out")["proj.weight"], model.proj.weight)


def test_a_wrong_fold_fails_its_local_proof_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = realistic_(LlamaLike(), 3).eval()
    src = _checkpoint(model, tmp_path / "in")
    right = nac.consumer_weight

    def wrong(c, gamma, stored, dtype=torch.float64):  # forgets the first channel
        g = gamma.clone()
        g[0] = 1.0
        return right(c, g, stored, dtype)

    monkeypatch.setattr(nac, "consumer_weight", wrong)
    with pytest.raises(ParityError, match=r"layers\.0\.input_layernorm and its consumers.*nothing was"):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_checkpoint_must_match_the_model(tmp_path: Path) -> None:
    model = realistic_(LlamaLike(), 4).eval()
    src = _checkpoint(model, tmp_path / "in", drop=("layers.1.down_proj.weight",))
    with pytest.raises(LoadError, match=r"parameter layers\.1\.down_proj\.weight is not in the checkpoint"):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, tmp_path / "in", tmp_path / "out")
    with pytest.raises(LoadError, match=r"has shape \(48, 32\) in the model and \(96, 32\) in the"):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, _checkpoint(
            realistic_(LlamaLike(ff=96), 4), tmp_path / "wide"), tmp_path / "out2")  # fmt: skip
    with pytest.raises(LoadError, match=r"has neither model\.safetensors\.index\.json nor"):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, tmp_path, tmp_path / "out")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-00009-of-00009.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=r"names model-00009-of-00009\.safetensors, which is not in"):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_files_are_never_overwritten_and_never_left_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = realistic_(LlamaLike(), 5).eval()
    src = _checkpoint(model, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("mine")
    with pytest.raises(UsageError, match="already exists; pass force=True"):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, src, out)
    assert [p.name for p in out.iterdir()] == ["model.safetensors.index.json"]
    assert (out / "model.safetensors.index.json").read_text() == "mine"
    with pytest.raises(UsageError, match=r"^out=.*in is the checkpoint folder .*in or inside it; choose "):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, src, src, force=True)
    # an error while the third tensor is written: nothing is placed, the new folder is removed
    import normfold.io.fold_shards as fold_shards

    calls = {"n": 0}
    real = fold_shards.StreamWriter.write_raw

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(fold_shards.StreamWriter, "write_raw", failing)
    with pytest.raises(OSError, match="No space left"):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, src, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    done = normfold.fold_norm_affine_checkpoint(_meta(LlamaLike), IDS, src, out, force=True)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [p for p in out.iterdir() if p.name.startswith(".normfold-")] and done.passed


def test_the_mapping_of_a_checkpoint_fold(tmp_path: Path) -> None:
    src = _checkpoint(realistic_(LlamaLike(layers=1), 6).eval(), tmp_path / "in")
    result = normfold.fold_norm_affine_checkpoint(_meta(LlamaLike, layers=1), IDS, src, tmp_path / "out")
    assert result.mapping("aimet") == [
        ("layers.0.input_layernorm", ["layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj"]),
        ("layers.0.post_attention_layernorm", ["layers.0.gate_proj", "layers.0.up_proj"]),
        ("norm", ["lm_head"]),
    ]


def test_an_untied_bert_head_writes_every_name_of_its_shared_bias(tmp_path: Path) -> None:
    """A checkpoint stores a tensor shared under two names once (``predictions_bias``, not
    ``decoder.bias``); untying under a tied config writes both, each with the folded value, as the
    in-memory fold's own copies (a Hugging Face load of an untied config ties neither back)."""
    model = BertHead().eval()
    ids = IDS.remainder(24)
    src = _checkpoint(model, tmp_path / "in", drop=("decoder.weight", "decoder.bias"))
    (src / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    result = normfold.fold_norm_affine_checkpoint(_meta(BertHead), ids, src, tmp_path / "out", untie=True)
    memory_model = BertHead().eval()
    memory_model.config = type("Config", (), {"tie_word_embeddings": True})()
    memory = normfold.fold_norm_affine(memory_model, ids, untie=True)
    written = _same_as_in_memory(result, memory, tmp_path / "out")
    assert {"decoder.weight", "decoder.bias", "predictions_bias"} <= set(written)
    assert torch.equal(written["decoder.bias"], memory.model.decoder.bias)
    assert not torch.equal(written["decoder.bias"], model.decoder.bias)  # the folded value, not the old
    assert any("decoder.bias" in n and "a copy of its own" in n for n in result.notes)


def _load_as_configured(folder: Path) -> LlamaLike:
    """The output loaded as a Hugging Face load would: the class tied as ``config.json`` says
    (tied when it says nothing), every stored tensor loaded by name (a tied pair is one tensor)."""
    config = folder / "config.json"
    tied = json.loads(config.read_text()).get("tie_word_embeddings", True) if config.exists() else False
    model = LlamaLike(tied=tied).eval()
    result = model.load_state_dict(_read_out(folder), strict=not tied)
    assert not result.unexpected_keys
    return model


@pytest.mark.parametrize("config", [True, False], ids=["config", "no-config"])
@pytest.mark.parametrize("drop", [("embed_tokens.weight",), ()], ids=["head-only", "both-names"])
def test_an_untied_head_stored_under_its_own_name_loads_as_the_in_memory_fold(
    tmp_path: Path, drop: tuple[str, ...], config: bool
) -> None:
    """A tied checkpoint storing the head's name (alone, or with the embedding's): the head is
    folded, the embedding keeps its original bytes, the config is untied (or, without one, the
    in-memory fold's note says so), and the output loads to the in-memory fold's function."""
    model = realistic_(LlamaLike(tied=True), 7).eval()
    src = _checkpoint(model, tmp_path / "in", drop=drop)
    if config:
        (src / "config.json").write_text(json.dumps({"model_type": "x", "tie_word_embeddings": True}))
    result = normfold.fold_norm_affine_checkpoint(_meta(LlamaLike, tied=True), IDS, src, tmp_path / "out",
                                                  untie=True)  # fmt: skip
    memory_model = realistic_(LlamaLike(tied=True), 7).eval()
    if config:
        memory_model.config = type("Config", (), {"tie_word_embeddings": True})()
    memory = normfold.fold_norm_affine(memory_model, IDS, untie=True)
    written = _same_as_in_memory(result, memory, tmp_path / "out")
    assert set(written) == {n for n, _ in LlamaLike().named_parameters()}  # both names, each its own
    assert torch.equal(written["embed_tokens.weight"], model.embed_tokens.weight)  # the original bytes
    assert torch.equal(written["lm_head.weight"], memory.model.lm_head.weight)  # the folded head
    if config:
        assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    else:
        assert memory.notes[0] in result.notes and "tie it back" in memory.notes[0]
    loaded = _load_as_configured(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(IDS), memory.model(IDS))
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=1e-4, atol=1e-4)


def test_the_out_folder_is_checked_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each refusal comes before the model is captured (the capture here would fail), with its
    exact reason, and leaves the folders as they were."""
    src = _checkpoint(realistic_(LlamaLike(layers=1), 8).eval(), tmp_path / "in")

    def no_capture(*args, **kwargs):
        raise AssertionError("captured before the out folder was checked")

    monkeypatch.setattr(nac, "capture", no_capture)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors.index.json").write_text("mine")
    cases = {
        tmp_path / "link": f"out={tmp_path / 'link'} is a symbolic link; normfold never writes through a "
        "link",
        tmp_path / "file": f"out={tmp_path / 'file'} exists and is not a folder",
        tmp_path / "no" / "out": f"out={tmp_path / 'no' / 'out'}: folder {tmp_path / 'no'} does not exist",
        src / "sub": f"out={src / 'sub'} is the checkpoint folder {src} or inside it; choose another folder",
        tmp_path / "full": f"{tmp_path / 'full' / 'model.safetensors.index.json'} already exists; pass "
        "force=True to replace it",
    }  # fmt: skip
    for out, message in cases.items():
        with pytest.raises(UsageError) as e:
            normfold.fold_norm_affine_checkpoint(_meta(LlamaLike, layers=1), IDS, src, out)
        assert str(e.value) == message
    assert not (src / "sub").exists() and not (tmp_path / "no").exists()
    assert (tmp_path / "full" / "model.safetensors.index.json").read_text() == "mine"
    assert list((tmp_path / "real").iterdir()) == []


def test_a_value_that_is_not_the_proved_one_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer recomputes each folded weight; one that differs from the value its proof ran on
    (by one element here) is refused before any file is placed."""
    src = _checkpoint(realistic_(LlamaLike(layers=1), 9).eval(), tmp_path / "in")
    right = nac._weight

    def drifted(fold, c, store):
        t = right(fold, c, store)
        if c.weight == "lm_head.weight":
            t[0, 0] = -t[0, 0]
        return t

    monkeypatch.setattr(nac, "_weight", drifted)
    message = (r"^lm_head\.weight: the value about to be written is not the one the proof of lm_head\.weight "
               r"ran on \(digests differ\); no file was placed$")  # fmt: skip
    with pytest.raises(ConsistencyError, match=message):
        normfold.fold_norm_affine_checkpoint(_meta(LlamaLike, layers=1), IDS, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_name_of_the_model_must_resolve_in_the_planned_output(tmp_path: Path) -> None:
    from normfold.io.sharded import ShardedCheckpoint
    from normfold.norm_checkpoint_plan import make_shard_plan

    model = realistic_(LlamaLike(layers=1, tied=True), 10).eval()
    ckpt = ShardedCheckpoint.open(_checkpoint(model, tmp_path / "in", drop=("lm_head.weight",)))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    aliases = {"lm_head.weight": ("embed_tokens.weight",), "embed_tokens.weight": ("lm_head.weight",)}
    tied = make_shard_plan(ckpt, names, aliases, set(), {}, {})  # tied back by the config: resolves
    assert "lm_head.weight" not in {t.name for ts in tied.shards.values() for t in ts}
    with pytest.raises(ConsistencyError, match=r"^the folded checkpoint would not hold the model's parameter "
                       r"lm_head\.weight under any name a load resolves; nothing was written$"):  # fmt: skip
        make_shard_plan(ckpt, names, {}, set(), {}, {})  # no alias: the head would be missing
    with pytest.raises(ConsistencyError, match=r"^norm\.weight: the folded value of norm\.weight was not "):
        make_shard_plan(ckpt, names, aliases, set(), {"norm.weight": (torch.float32, (32,))}, {})


def test_weight_files_the_fold_did_not_read_are_not_copied(tmp_path: Path) -> None:
    """A ``model.safetensors`` beside the index (transformers would load it first), ``.bin``
    weights, ``consolidated.safetensors``: copied, they would hold the unfolded model; each is
    skipped with a note naming it, every other file is copied."""
    from safetensors.torch import save_file

    model = realistic_(LlamaLike(layers=1), 11).eval()
    src = _checkpoint(model, tmp_path / "in")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, src / "model.safetensors")
    save_file(state, src / "consolidated.safetensors")
    torch.save(state, src / "pytorch_model.bin")
    (src / "pytorch_model.bin.index.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    result = normfold.fold_norm_affine_checkpoint(_meta(LlamaLike, layers=1), IDS, src, tmp_path / "out")
    placed = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert placed == sorted([*shards, "model.safetensors.index.json", "tokenizer.json"])
    assert ("not copied (weight files the fold did not read, which a loader could prefer to the folded "
            "ones): consolidated.safetensors, model.safetensors, pytorch_model.bin, "
            "pytorch_model.bin.index.json") in result.notes  # fmt: skip


def test_missing_tensors_and_a_racing_out_folder_are_normfold_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normfold.io import fold_shards
    from normfold.io.sharded import ShardedCheckpoint

    src = _checkpoint(LNIntoBiasFree().eval(), tmp_path / "in")
    ckpt = ShardedCheckpoint.open(src)
    for get in (ckpt.entry, ckpt.read):
        with pytest.raises(LoadError, match=rf"^no shard of the checkpoint {src} holds the tensor proj"):
            get("proj.bias")
    store = nac._Store(ckpt, nac.module_facts(LNIntoBiasFree(), new_biases=True))
    assert store.dtype_of("proj.bias") == torch.float32  # a new bias: its layer's weight dtype
    with pytest.raises(LoadError, match=r"^bias is not in the checkpoint .* nor the weight weight of its "):
        store.dtype_of("bias")  # a top-level name: no layer above it (no endless search)
    out = tmp_path / "out"

    def racing_mkdir(self, *args, **kwargs):
        out.write_text("another process")
        raise FileExistsError(17, "File exists")

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    with pytest.raises(UsageError, match=rf"^out={out} appeared while normfold was writing, not as a "):
        fold_shards._folder(out, create=True)
    assert out.read_text() == "another process"


def test_the_library_asks_for_the_architecture_in_its_own_words(tmp_path: Path) -> None:
    from normfold.norm_checkpoint_run import fold_norm_checkpoint_and_write

    src = _checkpoint(LNIntoBiasFree().eval(), tmp_path / "in")
    with pytest.raises(UsageError) as e:
        fold_norm_checkpoint_and_write(src, tmp_path / "out")
    assert str(e.value) == (f"{src} is a checkpoint folder: give its architecture as LoadOptions(model="
                            "'package.module:callable'), a factory built on the meta device, without weights")
    assert "--" not in str(e.value)  # no CLI flag in a library message


def test_an_overflowing_head_is_reported_without_its_whole_float64_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overflow reason's largest |value| is found block by block: while the final norm's fold
    is proved, no float64 tensor as large as the LM head is made (blocks of one row here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import normfold.engine.norm_affine.records as records

    model = realistic_(LlamaLike(layers=1), 12).eval()
    with torch.no_grad():
        model.lm_head.weight[5, 3] = 6e4
        model.norm.weight[3] = 1.3
    model = model.half()
    src = _checkpoint(model, tmp_path / "in")
    largest = {"float64": 0}

    class Widest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    largest["float64"] = max(largest["float64"], t.numel())
            return out

    real = nac._prove

    def watched(fold, store, rule):
        if fold.norm.name != "norm":
            return real(fold, store, rule)
        with Widest():
            return real(fold, store, rule)

    monkeypatch.setattr(records, "BLOCK", 32)  # one row of the head per block
    monkeypatch.setattr(nac, "_prove", watched)
    meta = _meta(LlamaLike, layers=1).half()
    result = normfold.fold_norm_affine_checkpoint(meta, IDS, src, tmp_path / "out")
    memory = normfold.fold_norm_affine(model, IDS)
    records_of = [(k.norm, k.code, k.reason) for k in result.kept]
    assert records_of == [(k.norm, k.code, k.reason) for k in memory.kept]
    assert records_of[-1] == ("norm", "overflow", "folding norm makes lm_head.weight (max |value| 77988.3, "
                              "torch.float16) overflow")  # fmt: skip
    assert 0 < largest["float64"] < model.lm_head.weight.numel()
