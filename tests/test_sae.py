"""The sae method: sae-lens SAEs as plain tensors (encode == SAE.encode), the hook -> site table, releases
(offline: from_pretrained monkeypatched), training on planted data, the sae-lens format cache, contract."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from bench import Activations, Site
from bench.checks import check_method
from methods.sae import (
    GEMMA3_270M_RELEASES,
    SparseAutoencoder,
    from_sae_lens,
    hook_for_site,
    release_site,
    site_for_hook,
)

sae_lens = pytest.importorskip("sae_lens")




def make_acts(x: torch.Tensor, site: Site, model_id: str = "tiny") -> Activations:
    n = len(x)
    return Activations(x, site, model_id, torch.zeros(n, dtype=torch.long), torch.arange(n),
                       torch.zeros(n, dtype=torch.long), ["text"])


def random_sae(
    arch: str, d: int = 16, m: int = 40, norm: str = "none", hook: str = "blocks.1.hook_resid_post", **cfg
):
    """A sae-lens inference SAE built from a config, every parameter random."""
    metadata = {"hook_name": hook, **cfg.pop("metadata", {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sae-lens warns about model_from_pretrained_kwargs
        sae = sae_lens.SAE.from_dict(
            {"architecture": arch, "d_in": d, "d_sae": m, "normalize_activations": norm, "metadata": metadata}
            | cfg
        )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "r_mag" else 1.0))
            if name == "threshold":
                p.abs_()
    return sae


ARCHS = [("standard", {}), ("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
         ("jumprelu", {}), ("gated", {})]
ARCH_IDS = ["standard", "topk", "topk-rescaled", "jumprelu", "gated"]


@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize(("arch", "extra"), ARCHS, ids=ARCH_IDS)
def test_encode_and_directions_equal_sae_lens(arch, extra, norm):
    sae = random_sae(arch, norm=norm, **extra)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 3 + 1
    w = from_sae_lens(sae)
    ref = sae.encode(x)
    assert (ref != 0).any() and (ref == 0).any()
    if extra.get("rescale_acts_by_decoder_norm"):  # folded as sae-lens's save_inference_model does
        torch.testing.assert_close(w.encode(x), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(w.W_dec, F.normalize(sae.W_dec, dim=-1))
    else:
        assert torch.equal(w.encode(x), ref)
        assert torch.equal(w.W_dec, sae.W_dec)
    assert w.site == Site(1, "resid") and w.center is False


@pytest.mark.parametrize(("arch", "extra"), ARCHS[:2] + ARCHS[3:], ids=ARCH_IDS[:2] + ARCH_IDS[3:])
def test_expected_average_only_in_with_a_scaling_factor(arch, extra):
    sae = random_sae(arch, norm="expected_average_only_in", **extra)
    x, s = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 3, 0.37
    w = from_sae_lens(sae, norm_scaling_factor=s)
    torch.testing.assert_close(w.encode(x), sae.encode(x * s), rtol=1e-5, atol=1e-4)
    folded = copy.deepcopy(sae)
    folded.fold_activation_norm_scaling_factor(s)  # what SAE.from_pretrained does with a known factor
    assert torch.equal(w.encode(x), folded.encode(x)) and torch.equal(w.W_dec, folded.W_dec)
    assert torch.equal(from_sae_lens(sae).encode(x), sae.encode(x))  # no factor: identity, as in sae-lens


def test_training_saes_convert_too():
    sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(
        d_in=16, d_sae=24, k=4, metadata=sae_lens.saes.sae.SAEMetadata(hook_name="blocks.2.mlp.hook_post")))
    x = torch.randn(32, 16)
    torch.testing.assert_close(from_sae_lens(sae).encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    assert from_sae_lens(sae).site == Site(2, "mlp")


@pytest.mark.parametrize(("hook", "site"), [
    ("blocks.3.hook_resid_post", Site(3, "resid")), ("blocks.3.hook_resid_pre", Site(2, "resid")),
    ("blocks.3.hook_mlp_out", Site(3, "mlp_out")), ("blocks.3.mlp.hook_post", Site(3, "mlp")),
])
def test_hook_to_site_table(hook, site):
    assert site_for_hook(hook) == site
    assert site_for_hook(hook_for_site(site)) == site


@pytest.mark.parametrize(("hook", "message"), [
    ("blocks.0.hook_resid_pre", "embeddings"),
    ("blocks.3.attn.hook_z", "supported: blocks.L.hook_resid_post"),
    ("blocks.3.hook_mlp_in", "blocks.L.mlp.hook_post"),
])
def test_unsupported_hooks_are_refused(hook, message):
    with pytest.raises(ValueError, match=message):
        site_for_hook(hook)


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_center_writing_weights_equals_transformer_lens_processing():
    """TL's center_writing_weights makes resid/mlp_out mean-zero over d_model and leaves mlp.hook_post alone,
    so an SAE of the processed model, fed the unprocessed model's activations via the adapter, is exact."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, n_ctx=8,
                                  act_fn="gelu", normalization_type="LN")
    raw = HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in raw.named_parameters():
            if not name.rsplit(".", 1)[-1].startswith("W_"):  # biases and LN weights off their defaults
                p.add_(torch.randn_like(p) * 0.3)
    processed = copy.deepcopy(raw)
    processed.process_weights_(fold_ln=False, center_writing_weights=True, center_unembed=False)
    tokens = torch.randint(0, 50, (3, 8))
    _, c_raw = raw.run_with_cache(tokens)
    _, c_proc = processed.run_with_cache(tokens)
    kwargs = {"metadata": {"model_from_pretrained_kwargs": {"center_writing_weights": True}}}
    hooks = [("blocks.1.hook_resid_pre", 16), ("blocks.1.hook_mlp_out", 16), ("blocks.1.mlp.hook_post", 32)]
    for hook, d in hooks:
        raw_x = c_raw[hook] - c_raw[hook].mean(-1, keepdim=True) if d == 16 else c_raw[hook]
        torch.testing.assert_close(c_proc[hook], raw_x, rtol=1e-5, atol=1e-5)
        sae = random_sae("jumprelu", d=d, hook=hook, **copy.deepcopy(kwargs))
        with torch.no_grad():
            sae.threshold.mul_(0.1)
        w = from_sae_lens(sae)
        assert w.center is not hook.endswith("hook_post")
        x_raw, x_proc = c_raw[hook].reshape(-1, d), c_proc[hook].reshape(-1, d)
        torch.testing.assert_close(w.encode(x_raw), sae.encode(x_proc), rtol=1e-4, atol=1e-4)


def _fake_from_pretrained(monkeypatch, sae):
    calls = []

    def fake(cls, release, sae_id, device="cpu", **kwargs):
        calls.append((release, sae_id, device))
        return sae

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", classmethod(fake))
    return calls


def test_fit_with_a_release_loads_and_converts(monkeypatch, caplog):
    meta = {"model_name": "google/gemma-3-270m"}
    sae = random_sae("jumprelu", hook="blocks.7.hook_resid_post", metadata=meta)
    calls = _fake_from_pretrained(monkeypatch, sae)
    method = SparseAutoencoder(release="gemma-scope-2-270m-pt-res-all").at_layer(7)
    assert method.site == Site(7, "resid")
    x = torch.randn(50, 16)
    with caplog.at_level(logging.WARNING, logger="methods.sae"):
        assert method.fit(make_acts(x, Site(7, "resid"), "gemma-3-270m-gguf")) is method
    assert not caplog.records  # same model, so no warning
    assert calls == [("gemma-scope-2-270m-pt-res-all", "layer_7_width_16k_l0_small", "cpu")]
    assert torch.equal(method.directions_, sae.W_dec) and torch.equal(method.encode(x), sae.encode(x))
    assert set(method.fit_metrics_) == {"explained_variance", "l0", "dead_fraction"}


def test_a_release_trained_with_centered_writing_weights_centers_its_input(monkeypatch):
    """gpt2-small-res-jb's directory entry says center_writing_weights (its own config may not)."""
    sae = random_sae("standard", hook="blocks.6.hook_resid_pre", metadata={"model_name": "gpt2-small"})
    _fake_from_pretrained(monkeypatch, sae)
    method = SparseAutoencoder(release="gpt2-small-res-jb", sae_id="blocks.{next_layer}.hook_resid_pre")
    x = torch.randn(30, 16) + 2
    fitted = method.at_layer(5).fit(make_acts(x, Site(5, "resid"), "gpt2"))
    assert fitted.weights_.center and fitted.site == Site(5, "resid")
    assert torch.equal(fitted.encode(x), sae.encode(x - x.mean(-1, keepdim=True)))


def test_release_model_mismatch_warns_and_width_or_site_mismatch_is_refused(monkeypatch, caplog):
    sae = random_sae("standard", hook="blocks.2.hook_mlp_out", metadata={"model_name": "gpt2"})
    _fake_from_pretrained(monkeypatch, sae)
    method = SparseAutoencoder(release="my-release", sae_id="blocks.{layer}.hook_mlp_out").at_layer(2)
    assert method.site == Site(2, "mlp_out")
    with caplog.at_level(logging.WARNING, logger="methods.sae"):
        method.fit(make_acts(torch.randn(20, 16), Site(2, "mlp_out"), "tiny:llama"))
    assert "gpt2" in caplog.text and "tiny:llama" in caplog.text
    with pytest.raises(ValueError, match="16-wide"):
        method.fit(make_acts(torch.randn(20, 24), Site(2, "mlp_out")))
    with pytest.raises(ValueError, match="reads mlp_out@2"):
        method.fit(make_acts(torch.randn(20, 16), Site(2, "resid")))


def test_at_layer_follows_the_release():
    assert SparseAutoencoder().at_layer(3).site == Site(3, "mlp")
    fixed = SparseAutoencoder(release="gpt2-small-res-jb", sae_id="blocks.6.hook_resid_pre")
    assert fixed.at_layer(5).site == Site(5, "resid")
    with pytest.raises(ValueError, match="reads resid@5, not layer 4"):
        fixed.at_layer(4)
    templated = SparseAutoencoder(release="gpt2-small-res-jb", sae_id="blocks.{next_layer}.hook_resid_pre")
    assert templated.at_layer(4).site == Site(4, "resid")
    with pytest.raises(ValueError, match="next_layer"):
        SparseAutoencoder(release="gpt2-small-res-jb", sae_id="blocks.{layer}.hook_resid_pre").at_layer(4)
    assert SparseAutoencoder(release="gemma-scope-2-270m-pt-mlp-all").at_layer(0).site == Site(0, "mlp_out")
    with pytest.raises(ValueError, match=r"layers with this sae_id: \[5, 9, 12, 15\]"):
        SparseAutoencoder(release="gemma-scope-2-270m-pt-res").at_layer(7)
    with pytest.raises(ValueError, match="needs sae_id"):
        SparseAutoencoder(release="gpt2-small-res-jb").at_layer(0)


def test_gemma3_270m_release_names_are_real():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for release, template in GEMMA3_270M_RELEASES.items():
        assert directory[release].model == "google/gemma-3-270m"
        layers = [i for i in range(18) if template.format(layer=i) in directory[release].saes_map]
        assert layers == (list(range(18)) if release.endswith("-all") else [5, 9, 12, 15])
        kind = "mlp_out" if "-mlp" in release else "resid"
        assert release_site(release, template.format(layer=layers[-1])) == Site(layers[-1], kind)


def planted(n: int = 8192, d: int = 32, m: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample is the sum of 3 of m unit atoms, weights in [0.5, 1.5]: (x [n, d], atoms [m, d])."""
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(m, d, generator=g), dim=-1)
    idx = torch.stack([torch.randperm(m, generator=g)[:3] for _ in range(n)])
    codes = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, 3, generator=g) + 0.5)
    return codes @ atoms, atoms


def test_training_recovers_a_planted_dictionary_and_reloads_from_the_cache(caplog):
    from scipy.optimize import linear_sum_assignment

    x, atoms = planted()
    acts = make_acts(x, Site(0, "mlp"))
    params = {"d_sae": 48, "k": 3, "n_steps": 1000, "batch_size": 256, "lr": 3e-3, "dead_feature_window": 50}
    first = SparseAutoencoder(**params).fit(acts)
    cos = atoms @ F.normalize(first.directions_, dim=-1).T
    rows, cols = linear_sum_assignment(-cos.numpy())
    assert cos[rows, cols].mean() > 0.9
    m = first.fit_metrics_
    assert m["explained_variance"] > 0.85 and m["l0"] == 3 and 0 <= m["dead_fraction"] < 0.2
    assert m["train_seconds"] > 0 and m["cache_hit"] == 0
    with caplog.at_level(logging.INFO, logger="methods.sae"):
        second = SparseAutoencoder(**params).fit(acts)
    assert "reloading" in caplog.text and second.fit_metrics_["cache_hit"] == 1
    assert torch.equal(second.directions_, first.directions_)
    assert torch.equal(second.encode(x[:100]), first.encode(x[:100]))
    assert second.fit_metrics_["train_seconds"] == m["train_seconds"]


@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_training_streams_batches_from_the_store_and_equals_in_memory(arch, tmp_path, monkeypatch):
    """Training on a streamed store never loads x (Activations._read_all raises), reads at most one block of rows
    at a time (bounded by FEATBENCH_MEMORY_BUDGET), and gives exactly the weights of training on the tensor."""
    from bench.activations import load_store
    from bench.store import RowSource, ShardWriter

    x, _ = planted(n=1000, d=12, m=20, seed=3)
    writer = ShardWriter(tmp_path / ".s.partial", {"planted": 3}, shard_tokens=128)
    for start in range(0, 1000, 40):  # 4 texts of 10 tokens per batch
        tok = torch.arange(start, start + 40)
        cols = {"x": x[tok], "prompt_idx": tok // 10, "position": tok % 10, "token_ids": tok % 7}
        writer.add(cols, (start + 40) // 10)
    writer.finish(tmp_path / "s", torch.float32)
    streamed = load_store(tmp_path / "s", Site(0, "mlp"), "tiny", [f"t{i}" for i in range(100)], "k").cap(900, 0)
    in_memory = make_acts(x[streamed.rows], Site(0, "mlp"))  # no key: cached under the hash of x

    monkeypatch.setenv("FEATBENCH_MEMORY_BUDGET", "100K")  # blocks of 100K / 8 bytes = 266 rows of 12 floats
    largest, training = [], []

    def spy(read):
        def counted(self, *a, **kw):
            out = read(self, *a, **kw)
            if training:  # reads of the training loop (fit_metrics afterwards reads its own chunks)
                largest.append(len(out))
            return out
        return counted

    for name in ("read", "read_range"):
        monkeypatch.setattr(RowSource, name, spy(getattr(RowSource, name)))

    def train(self, *a, _f=SparseAutoencoder._train):
        training.append(True)
        try:
            return _f(self, *a)
        finally:
            training.clear()
    monkeypatch.setattr(SparseAutoencoder, "_train", train)

    def loads_all(self):
        raise AssertionError("training loaded the whole activation tensor")

    params = {"architecture": arch, "d_sae": 20, "k": 3, "n_steps": 40, "batch_size": 64, "seed": 5}
    with monkeypatch.context() as m:
        m.setattr(Activations, "_read_all", loads_all)
        a = SparseAutoencoder(**params).fit(streamed)
    assert streamed.streams and largest and max(largest) <= 266
    assert sum(n == 256 for n in largest) > 1, "shuffled batches are read in blocks of whole batches"
    b = SparseAutoencoder(**params).fit(in_memory)
    assert a.fit_metrics_["cache_hit"] == b.fit_metrics_["cache_hit"] == 0
    assert torch.equal(a.directions_, b.directions_) and torch.equal(a.weights_.W_enc, b.weights_.W_enc)
    assert a.fit_metrics_["final_loss"] == b.fit_metrics_["final_loss"]


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu", "gated"])
def test_contract(arch):
    x, _ = planted(n=300, d=16, m=24)
    check_method(SparseAutoencoder(architecture=arch, d_sae=24, k=4, n_steps=20, batch_size=64),
                 make_acts(x, Site(0, "mlp")))


def test_bad_architecture_is_refused():
    with pytest.raises(ValueError, match="valid: topk, standard, jumprelu, gated"):
        SparseAutoencoder(architecture="relu").fit(make_acts(torch.randn(10, 4), Site(0, "mlp")))


@pytest.mark.api
def test_gpt2_small_res_jb_release_matches_sae_lens_and_transformer_lens():
    """A real release: blocks.6.hook_resid_pre of gpt2-small-res-jb (trained with centered writing weights)
    on featbench's resid@5 of Hugging Face GPT-2 equals SAE.encode on TransformerLens's processed model."""
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.hooks import read

    sae = sae_lens.SAE.from_pretrained("gpt2-small-res-jb", "blocks.6.hook_resid_pre")
    w = from_sae_lens(sae)
    assert w.site == Site(5, "resid") and w.center and w.W_dec.shape == (24576, 768)
    hf, tok = AutoModelForCausalLM.from_pretrained("gpt2").eval(), AutoTokenizer.from_pretrained("gpt2")
    tl = HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf, tokenizer=tok,
                                                         center_writing_weights=True)
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    ours = read(hf, dict(ids), [Site(5, "resid")])[Site(5, "resid")][0]
    _, cache = tl.run_with_cache(ids["input_ids"], prepend_bos=False)
    theirs = cache["blocks.6.hook_resid_pre"][0]
    torch.testing.assert_close(w.encode(ours), sae.encode(theirs), rtol=1e-3, atol=1e-3)
    method = SparseAutoencoder(release="gpt2-small-res-jb", sae_id="blocks.{next_layer}.hook_resid_pre")
    method = method.at_layer(5).fit(make_acts(ours, Site(5, "resid"), "gpt2"))
    torch.testing.assert_close(method.encode(ours), sae.encode(theirs), rtol=1e-3, atol=1e-3)
