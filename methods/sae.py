"""Sparse autoencoders through sae-lens: a published release, or one trained here on the run's activations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench import Activations, Site, register_method
from bench.activations import cache_root

log = logging.getLogger(__name__)
ARCHITECTURES = ("topk", "standard", "jumprelu", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
CACHE_VERSION = 1
# Gemma Scope 2 releases for google/gemma-3-270m in sae-lens's pretrained_saes.yaml -> default sae_id
# ("{layer}" is the run's layer). `-all` releases cover layers 0..17 at widths 16k/262k, l0 small/big;
# the others cover layers 5, 9, 12, 15 at 16k/65k/262k (res also 1m), l0 small/medium/big.
GEMMA3_270M_RELEASES: dict[str, str] = {
    "gemma-scope-2-270m-pt-res-all": "layer_{layer}_width_16k_l0_small",  # resid (decoder-layer output)
    "gemma-scope-2-270m-pt-mlp-all": "layer_{layer}_width_16k_l0_small",  # mlp_out (post-FFN norm)
    "gemma-scope-2-270m-pt-res": "layer_{layer}_width_16k_l0_medium",
    "gemma-scope-2-270m-pt-mlp": "layer_{layer}_width_16k_l0_medium",
}
_HOOKS: dict[str, tuple[int, str]] = {  # TransformerLens hook -> (layer shift, featbench site kind)
    r"blocks\.(\d+)\.hook_resid_post": (0, "resid"),
    r"blocks\.(\d+)\.hook_resid_pre": (-1, "resid"),
    r"blocks\.(\d+)\.hook_mlp_out": (0, "mlp_out"),
    r"blocks\.(\d+)\.mlp\.hook_post": (0, "mlp"),
}
_HOOK_HELP = ("blocks.L.hook_resid_post (resid@L), blocks.L.hook_resid_pre (resid@L-1, L >= 1), "
              "blocks.L.hook_mlp_out (mlp_out@L), blocks.L.mlp.hook_post (mlp@L)")


def _sae_lens() -> Any:
    try:
        import sae_lens
    except ImportError as e:
        raise ImportError("the sae method needs sae-lens: pip install 'featbench[sae]'") from e
    return sae_lens


def site_for_hook(hook_name: str) -> Site:
    """The featbench site of a TransformerLens hook name, e.g. `blocks.6.hook_resid_pre` -> resid@5."""
    for pattern, (shift, kind) in _HOOKS.items():
        if m := re.fullmatch(pattern, hook_name):
            if int(m.group(1)) + shift < 0:
                raise ValueError(f"hook {hook_name!r} reads the embeddings, which are not a featbench site; "
                                 f"supported: {_HOOK_HELP}")
            return Site(int(m.group(1)) + shift, kind)  # type: ignore[arg-type]
    raise ValueError(f"unsupported SAE hook {hook_name!r}; supported: {_HOOK_HELP}")


def hook_for_site(site: Site) -> str:
    """The TransformerLens hook name that reads `site`."""
    return {"resid": f"blocks.{site.layer}.hook_resid_post", "mlp_out": f"blocks.{site.layer}.hook_mlp_out",
            "mlp": f"blocks.{site.layer}.mlp.hook_post"}[site.kind]


@dataclass
class SaeWeights:
    """A sae-lens SAE as plain tensors plus its site and input transform: `encode` == `SAE.encode`."""

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae] (the gate bias b_gate for gated SAEs)
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    site: Site
    activation: str = "relu"  # relu (standard) | topk | jumprelu | gated
    k: int = 0  # topk
    threshold: Tensor | None = None  # [d_sae] jumprelu
    r_mag: Tensor | None = None  # [d_sae] gated magnitude path: W_enc * exp(r_mag), bias b_mag
    b_mag: Tensor | None = None  # [d_sae]
    apply_b_dec_to_input: bool = True
    normalize: str = "none"  # none | constant_norm_rescale | layer_norm (run-time, as in sae-lens)
    center: bool = False  # TransformerLens center_writing_weights: subtract the mean over d_model first
    model_name: str | None = None

    def _input(self, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """[n, d_in] model activations -> (SAE-space target, SAE input, map from SAE space back)."""
        x = x.to(self.W_enc)
        if self.center:
            x = x - x.mean(dim=-1, keepdim=True)
        if self.normalize == "constant_norm_rescale":
            coeff = (self.W_enc.shape[0] ** 0.5) / x.norm(dim=-1, keepdim=True)
            xn, back = x * coeff, (lambda y: y / coeff)
        elif self.normalize == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            xn, back = (x - mu) / (std + 1e-5), (lambda y: y * std + mu)
        else:
            xn, back = x, (lambda y: y)
        return x, xn - self.b_dec * self.apply_b_dec_to_input, back

    def encode(self, x: Tensor) -> Tensor:
        """[n, d_in] -> [n, d_sae] feature activations."""
        return self._codes(self._input(x)[1])

    def _codes(self, sae_in: Tensor) -> Tensor:
        pre = sae_in @ self.W_enc + self.b_enc
        if self.activation == "topk":
            values, idx = torch.topk(pre, k=self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, values.relu())
        if self.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        if self.activation == "gated":
            magnitude = (sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()  # type: ignore[union-attr]
            return (pre > 0).to(pre.dtype) * magnitude
        return pre.relu()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[n, d_in] -> (target [n, d_in] after centering, codes [n, d_sae], reconstruction [n, d_in])."""
        target, sae_in, back = self._input(x)
        z = self._codes(sae_in)
        return target, z, back(z @ self.W_dec + self.b_dec)


def from_sae_lens(
    sae: Any, hook_name: str | None = None, norm_scaling_factor: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> SaeWeights:
    """Plain tensors from an in-memory sae-lens `SAE` (inference or training class).

    TopK decoder-norm rescaling and an `expected_average_only_in` factor are folded into the weights
    exactly as sae-lens's own save/load does; without a factor that normalisation is the identity at run
    time, as in sae-lens. `center_writing_weights` in the SAE's `model_from_pretrained_kwargs` (or in
    `model_kwargs`, merged over them) becomes a centering of `resid`/`mlp_out` inputs: TransformerLens's
    centering makes every write to the residual stream mean-zero over d_model, so the SAE saw centered
    vectors there (the MLP hidden state is untouched; the model's outputs are unchanged)."""
    cfg, p = sae.cfg, {k: v.detach().float().clone() for k, v in sae.state_dict().items()}
    arch = cfg.architecture()
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported SAE architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    if cfg.normalize_activations not in NORMALIZATIONS:
        raise ValueError(f"unsupported normalize_activations {cfg.normalize_activations!r}; "
                         f"supported: {', '.join(NORMALIZATIONS)}")
    hook = hook_name or cfg.metadata.hook_name
    if hook is None:
        raise ValueError("the SAE's metadata names no hook_name; pass one, e.g. 'blocks.6.hook_resid_post'")
    site = site_for_hook(hook)
    W_enc, W_dec, b_dec, b_enc = p["W_enc"], p["W_dec"], p["b_dec"], p.get("b_enc", p.get("b_gate"))
    if arch == "topk" and cfg.rescale_acts_by_decoder_norm:  # fold as sae-lens _fold_norm_topk
        norm = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norm[None, :], b_enc * norm, W_dec / norm[:, None]
    if cfg.normalize_activations == "expected_average_only_in" and norm_scaling_factor is not None:
        s = float(norm_scaling_factor)  # as SAE.fold_activation_norm_scaling_factor
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    kwargs = {**(cfg.metadata.model_from_pretrained_kwargs or {}), **(model_kwargs or {})}
    return SaeWeights(
        W_enc, b_enc, W_dec, b_dec, site, activation={"standard": "relu"}.get(arch, arch),
        k=int(getattr(cfg, "k", 0)), threshold=p.get("threshold"), r_mag=p.get("r_mag"), b_mag=p.get("b_mag"),
        apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
        normalize=cfg.normalize_activations if cfg.normalize_activations in NORMALIZATIONS[2:] else "none",
        center=bool(kwargs.get("center_writing_weights")) and site.kind != "mlp",
        model_name=cfg.metadata.model_name,
    )


def release_site(release: str, sae_id: str) -> Site | None:
    """The site of a release's SAE from sae-lens's offline directory (a hook-name id, or a Gemma Scope 2
    `resid_post`/`mlp_out` folder), or None when only the downloaded config would tell."""
    try:
        return site_for_hook(sae_id)
    except ValueError:
        pass
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    path = getattr(get_pretrained_saes_directory().get(release), "saes_map", {}).get(sae_id, "")
    kind = "resid" if "resid_post" in path else "mlp_out" if "mlp_out" in path else None
    layer = re.search(r"layer_(\d+)", path)
    return Site(int(layer.group(1)), kind) if kind and layer else None  # type: ignore[arg-type]


def _same_model(a: str | None, b: str) -> bool:
    def key(name: str) -> str:
        name = name.lower().rsplit("/", 1)[-1].removesuffix("-gguf")
        return {"gpt2-small": "gpt2"}.get(name, name)

    return a is None or key(a) == key(b)


@torch.no_grad()
def fit_metrics(w: SaeWeights, acts: Activations, chunk: int = 4096) -> dict[str, float]:
    """Explained variance (1 - SSE/SST pooled over dims), L0 per token, fraction of features never active."""
    sse = sq = l0 = 0.0
    total, n, fired = None, 0, torch.zeros(w.W_dec.shape[0], dtype=torch.bool, device=w.W_dec.device)
    for x in acts.iter_chunks(chunk):
        target, z, recon = w.forward(x)
        sse += (target - recon).double().pow(2).sum().item()
        sq += target.double().pow(2).sum().item()
        total = target.double().sum(0) + (0 if total is None else total)
        n, l0 = n + len(x), l0 + (z != 0).sum().item()
        fired |= (z != 0).any(0)
    if n == 0:
        raise ValueError("the sae method got no tokens to fit on")
    sst = sq - (total.pow(2).sum().item() / n)  # type: ignore[union-attr]
    return {"explained_variance": 1 - sse / max(sst, 1e-12), "l0": l0 / n,
            "dead_fraction": 1 - fired.float().mean().item()}


@register_method("sae")
@dataclass
class SparseAutoencoder:
    """A sparse autoencoder: features = its codes, directions_ = its decoder rows W_dec [d_sae, d_site].

    Trained here (the offline default): `-M sae.architecture=topk -M sae.d_sae=512 -M sae.k=32` trains a
    sae-lens TrainingSAE (topk, standard, jumprelu or gated) with sae-lens's loss, Adam and its input-norm
    scaling (folded in after training) on the run's cached activations at `site` (default: the MLP hidden
    state, like SNMF); saved in sae-lens's format under `<cache>/sae/<hash>/` and reloaded on a re-run.
    `l1_coefficient` is the architecture's sparsity coefficient (jumprelu: its L0 coefficient).

    A published release (needs the hub): `-M sae.release=gemma-scope-2-270m-pt-res-all` (sae_id defaults
    from GEMMA3_270M_RELEASES; these read resid@L, `...-mlp-all` reads mlp_out@L, layers 0..17), or
    `-M sae.release=gemma-scope-2-270m-pt-res -M "sae.sae_id=layer_{layer}_width_16k_l0_small"` (layers
    5, 9, 12, 15), or `-M sae.release=gpt2-small-res-jb -M "sae.sae_id=blocks.{next_layer}.hook_resid_pre"`.
    `{layer}` is the run's layer and `{next_layer}` that plus one (resid_pre L+1 is resid@L). The site
    comes from the release's hook (when sae-lens's offline directory can't tell it, from `sae.site`'s kind,
    e.g. `-M sae.site=resid`; fit() refuses a mismatch); the architecture/training fields are unused."""

    site: Site = field(default_factory=lambda: Site(layer=0, kind="mlp"))
    release: str | None = None
    sae_id: str | None = None
    architecture: str = "topk"
    d_sae: int = 512
    k: int = 32
    l1_coefficient: float = 5.0
    lr: float = 1e-3
    n_steps: int = 1000  # ~2 min per layer on 2 CPU cores at d_site=2048, d_sae=512
    batch_size: int = 512
    dead_feature_window: int = 200  # steps without firing before the topk aux loss revives a feature
    seed: int = 0
    device: str = "cpu"

    requires: ClassVar[tuple[str, ...]] = ("sae_lens: pip install 'featbench[sae]'",)  # bench.preflight

    def _sae_id(self, layer: int) -> str:
        template = self.sae_id or GEMMA3_270M_RELEASES.get(self.release or "")
        if template is None:
            raise ValueError(f"release {self.release!r} needs sae_id (may contain {{layer}}); releases with "
                             f"a default: {', '.join(GEMMA3_270M_RELEASES)}")
        sae_id = template.format(layer=layer, next_layer=layer + 1)
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        info = get_pretrained_saes_directory().get(self.release)
        if info is not None and sae_id not in info.saes_map:
            have = [i for i in range(256) if template.format(layer=i, next_layer=i + 1) in info.saes_map]
            hint = f"layers with this sae_id: {have}" if have else f"e.g. {list(info.saes_map)[:4]}"
            raise ValueError(f"release {self.release!r} has no sae_id {sae_id!r}; {hint}")
        return sae_id

    def at_layer(self, layer: int) -> SparseAutoencoder:
        """A copy reading `layer`; for a release, at the kind of site its hook reads."""
        if self.release is None:
            return replace(self, site=Site(layer, self.site.kind))
        _sae_lens()
        sae_id = self._sae_id(layer)
        site = release_site(self.release, sae_id) or Site(layer, self.site.kind)  # else fit() checks it
        if site.layer != layer:
            hint = "use {next_layer} in a hook_resid_pre sae_id" if "{" in (self.sae_id or "{") else \
                f"put {{layer}} in sae_id or run layer {site.layer}"
            raise ValueError(f"{self.release}/{sae_id} reads {site}, not layer {layer}; {hint}")
        return replace(self, site=site)

    def fit(self, acts: Activations) -> SparseAutoencoder:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        sl, name, extra = _sae_lens(), "the trained SAE", {}
        if self.release is not None:
            sae_id = self._sae_id(self.site.layer)
            name = f"{self.release} {sae_id}"
            log.info("sae: loading release %s", name)
            from sae_lens.loading.pretrained_saes_directory import get_config_overrides

            sae = sl.SAE.from_pretrained(self.release, sae_id, device=self.device)
            tl_kwargs = get_config_overrides(self.release, sae_id).get("model_from_pretrained_kwargs")
            w = from_sae_lens(sae, model_kwargs=tl_kwargs)
        else:
            w, extra = self._train_or_load(acts)
        if w.site != acts.site:
            raise ValueError(f"{name} reads {w.site} but the activations are from {acts.site}; "
                             f"set the method's site (sae.site={w.site.kind}) or layer to match")
        if w.W_enc.shape[0] != acts.d:
            raise ValueError(f"{name} reads {w.W_enc.shape[0]}-wide activations at {w.site}, but "
                             f"{acts.model_id} gives {acts.d}-wide ones there")
        if not _same_model(w.model_name, acts.model_id):
            log.warning("sae: %s was trained on %s but the run's model is %s", name, w.model_name,
                        acts.model_id)
        self.weights_, self.directions_ = w, w.W_dec
        self.fit_metrics_ = {**fit_metrics(w, acts), **extra}
        return self

    def encode(self, x: Tensor) -> Tensor:
        """[n, d_site] -> [n, d_sae] SAE feature activations."""
        return self.weights_.encode(x)

    def _train_or_load(self, acts: Activations) -> tuple[SaeWeights, dict[str, float]]:
        sl = _sae_lens()
        data = acts.key or _digest(acts)
        params = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "release")}
        spec = json.dumps([data, [len(acts), acts.d], params, CACHE_VERSION, sl.__version__], default=str)
        path = cache_root() / "sae" / hashlib.sha256(spec.encode()).hexdigest()[:24]
        hit = (path / "fit.json").exists()
        if hit:
            log.info("sae: reloading the trained SAE from %s", path)
        else:
            self._train(acts, path)
        w = from_sae_lens(sl.SAE.load_from_disk(path, device=self.device))
        return w, {**json.loads((path / "fit.json").read_text()), "cache_hit": float(hit)}

    def _train(self, acts: Activations, path: Path) -> None:
        """Train with sae-lens's TrainingSAE and loss in our own loop; save in sae-lens's format at `path`.

        The activations stream: shuffled batches are read from the store a block of rows at a time
        (`_batches`), so x is never loaded whole; the batches are those of indexing the full tensor."""
        sl = _sae_lens()
        from sae_lens.saes.sae import SAEMetadata, TrainCoefficientConfig, TrainStepInput

        n, d = len(acts), acts.d
        if n == 0:
            raise ValueError("the sae method got no tokens to fit on")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be in 1..d_sae={self.d_sae}")
        sae_cls, cfg_cls = sl.registry.get_sae_training_class(self.architecture)
        extra = {"topk": {"k": self.k}, "jumprelu": {"l0_coefficient": self.l1_coefficient}}.get(
            self.architecture, {"l1_coefficient": self.l1_coefficient})
        cfg = cfg_cls(d_in=d, d_sae=self.d_sae, normalize_activations="expected_average_only_in", **extra,
                      metadata=SAEMetadata(model_name=acts.model_id, hook_name=hook_for_site(acts.site)))
        with torch.random.fork_rng(devices=[]):  # initialise on the CPU from our seed, then move
            torch.manual_seed(self.seed)
            sae = sae_cls(cfg).to(self.device)
        chunk = acts.chunk_tokens(itemsize=4)
        norms = torch.cat([x.float().norm(dim=-1) for x in acts.iter_chunks(chunk)])  # [n_tokens]
        scale = d**0.5 / norms.mean().item()  # sae-lens ActivationScaler.estimate_scaling_factor
        coefficients = {name: c.value if isinstance(c, TrainCoefficientConfig) else float(c)
                        for name, c in sae.get_coefficients().items()}
        opt = torch.optim.Adam(sae.parameters(), lr=self.lr)
        batches = _batches(acts, min(self.batch_size, n), self.seed, chunk)
        since_fired = torch.zeros(self.d_sae, device=self.device)
        start, loss = time.perf_counter(), float("nan")
        for step in tqdm(range(self.n_steps), desc=f"sae {acts.site}", unit="step", leave=False):
            batch = next(batches).to(self.device) * scale  # [batch_size, d_site]
            dead = since_fired > self.dead_feature_window
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=batch, coefficients=coefficients, dead_neuron_mask=dead, n_training_steps=step,
                is_logging_step=False))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # as sae-lens's SAETrainer
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                since_fired += 1
                since_fired[(out.feature_acts != 0).any(0)] = 0
            loss = out.loss.item()
        seconds = time.perf_counter() - start
        log.info("sae: trained %s %d x %d on %d tokens in %.1fs (loss %.4g)",
                 self.architecture, d, self.d_sae, n, seconds, loss)
        sae.fold_activation_norm_scaling_factor(scale)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            sae.save_inference_model(tmp)
            (tmp / "fit.json").write_text(json.dumps({"train_seconds": seconds, "final_loss": loss}))
            os.replace(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "fit.json").exists():  # another process may have won the race
                raise


def _batches(acts: Activations, batch_size: int, seed: int, block_tokens: int) -> Iterator[Tensor]:
    """Endless shuffled float32 batches [batch_size, d_site] of `acts`: each epoch a seeded permutation of the tokens
    cut into whole batches (the remainder dropped), read `block_tokens` (rounded to whole batches) rows at a time
    with `Activations.take`, so a streamed x stays on disk. Equals indexing the whole tensor with the permutation."""
    n, gen = len(acts), torch.Generator().manual_seed(seed)
    per_read = max(1, block_tokens // batch_size) * batch_size
    while True:
        perm = torch.randperm(n, generator=gen)[: n // batch_size * batch_size]  # [n_batches * batch_size]
        for start in range(0, len(perm), per_read):
            yield from acts.take(perm[start : start + per_read]).float().split(batch_size)


def _digest(acts: Activations) -> str:
    """sha256 of x's bytes, streamed a chunk at a time (equal to hashing the whole contiguous tensor)."""
    h = hashlib.sha256()
    for x in acts.iter_chunks(acts.chunk_tokens()):
        h.update(x.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()
