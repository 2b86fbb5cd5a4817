"""Checkpoints: one `.safetensors` file whose header carries the JSON metadata.

One file means one atomic rename publishes weights and metadata together, and safetensors means loading
never unpickles. The metadata (header key "yinshi") holds the model config, the full vocabulary, the
form tokens, the corpus hash, training metrics, a version and a SHA-256 of the weights, so a flipped
byte in the tensor data is caught even where the values still parse.

    save_checkpoint(path, model, vocab, meta={"metrics": {...}})
    ckpt = load_checkpoint(path)  # -> Checkpoint(model, vocab, meta)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from engine.files import atomic_write_bytes
from engine.model.network import ModelConfig, PoemModel
from engine.poem.vocab import FORM_TOKENS, Vocab

FORMAT = "yinshi-checkpoint"
FORMAT_VERSION = 1
META_KEY = "yinshi"
PACKAGE_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"  # shipped; served from an empty store
DEFAULT_CHECKPOINT = PACKAGE_CHECKPOINTS / "lstm-large.safetensors"  # the default model of `generate`, the reports, bench


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Checkpoint:
    model: PoemModel
    vocab: Vocab
    meta: dict

    @property
    def version(self) -> str:
        return self.meta["version"]


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def meta_digest(meta: dict) -> str:
    """SHA-256 of the metadata (without this field): a flipped byte in the header that still parses as
    JSON — a vocabulary character, a config number — is caught, as the weights' digest catches theirs."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def make_version(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


SCALE_SUFFIX = ".scale"  # an int8 matrix's per-row scales: weight ≈ int8 · scale[:, None]


def quantize_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices as int8 with one float32 scale per row (symmetric: the row's largest |value| maps to 127);
    vectors (biases) stay float16. A quarter of float32's bytes."""
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2:
            scale = (t.float().abs().amax(dim=1) / 127).clamp_min(1e-12)  # (rows,)
            out[name] = torch.round(t.float() / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            out[name + SCALE_SUFFIX] = scale.contiguous()
        else:
            out[name] = t.to(torch.float16).contiguous()
    return out


def dequantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights of `quantize_int8`'s output (float tensors pass through)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        out[name] = t.float() * scale[:, None] if t.dtype == torch.int8 and scale is not None else t
    return out


def save_checkpoint(path, model: PoemModel, vocab: Vocab, meta: dict | None = None, half: bool = False,
                    int8: bool = False) -> dict:
    """Write model + vocab + metadata atomically; returns the metadata written. `half`: float16 weights;
    `int8`: int8 matrices with per-row scales (for shipping a large model small)."""
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} tokens but the model expects {model.config.vocab_size}")
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if int8:
        tensors, dtype = quantize_int8(tensors), torch.int8
    now = dt.datetime.now(dt.timezone.utc)
    full = {
        "version": make_version(now),
        "created_at": now.isoformat(timespec="seconds"),
        **(meta or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "vocab": vocab.tokens,
        "form_tokens": list(FORM_TOKENS),
        "dtype": str(dtype).removeprefix("torch."),
        "num_parameters": model.num_parameters(),
        "weights_sha256": weights_digest(tensors),
    }
    full["meta_sha256"] = meta_digest(full)
    data = st_save(tensors, metadata={META_KEY: json.dumps(full, ensure_ascii=False)})
    atomic_write_bytes(Path(path), data)
    return full


def read_meta(path) -> dict:
    """The metadata of a checkpoint, checked for shape but without loading the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({e})") from None
    if META_KEY not in header:
        raise CheckpointError(path, f"no '{META_KEY}' metadata in the header: not a yinshi checkpoint")
    try:
        meta = json.loads(header[META_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 4,300+ digit integer, deep nesting
        raise CheckpointError(path, f"metadata is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(path, f"metadata format is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    for key in ("config", "vocab", "version", "weights_sha256", "meta_sha256"):
        if key not in meta:
            raise CheckpointError(path, f"metadata lacks {key!r}")
    if meta_digest(meta) != meta["meta_sha256"]:
        raise CheckpointError(path, "metadata does not match its SHA-256: the header is corrupt")
    if meta.get("form_tokens") != list(FORM_TOKENS):
        raise CheckpointError(path, f"form tokens {meta.get('form_tokens')!r} do not match {list(FORM_TOKENS)}")
    return meta


def load_checkpoint(path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; any problem raises CheckpointError naming the file."""
    path = Path(path)
    meta = read_meta(path)
    try:
        config = ModelConfig.from_dict(meta["config"])
        vocab = Vocab(meta["vocab"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad config or vocabulary ({e})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(path, f"vocabulary has {len(vocab)} tokens, config says {config.vocab_size}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"weights cannot be read ({e})") from None
    if weights_digest(tensors) != meta["weights_sha256"]:
        raise CheckpointError(path, "weights do not match their SHA-256: the file is corrupt")
    int8 = meta.get("dtype") == "int8"
    # NOTE: the shapes are checked on a model without storage first: a header may ask for a model far larger
    # than the weights in the file (hidden_dim 2^22 in a 25 KB file).
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PoemModel(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items() if not (int8 and k.endswith(SCALE_SUFFIX))}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise CheckpointError(path, f"weights do not fit the config (missing {missing}, extra {extra}, wrong shape {wrong})")
    if int8:
        for k, t in tensors.items():
            if t.dtype != torch.int8:
                continue
            scale = tensors.get(k + SCALE_SUFFIX)
            if scale is None:
                raise CheckpointError(path, "an int8 matrix has no scales")
            if t.dim() != 2 or tuple(scale.shape) != (t.shape[0],) or not scale.is_floating_point():
                raise CheckpointError(path, f"the scales of {k!r} are not one float per row")
        tensors = dequantize(tensors)
    model = PoemModel(config)
    for name, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(path, f"tensor {name!r} holds NaN, infinite or non-float values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.to(device).eval()
    return Checkpoint(model=model, vocab=vocab, meta=meta)
