"""The character language model: Embedding → RNN | LSTM | GRU → Linear (softmax over the vocabulary).

One class, read top to bottom. The recurrent state is kept as one tensor of shape
(num_layers, B, state_dim) for every cell — an LSTM's h and c side by side — so that the scheduler can
add and drop batch rows with plain indexing whatever the cell. `compile_step` (at the end) is the same
step as one TorchScript call, for the engine's step loop.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

log = logging.getLogger(__name__)

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"  # rnn | lstm | gru
    embed_dim: int = 128
    hidden_dim: int = 384
    num_layers: int = 2
    dropout: float = 0.1  # between recurrent layers and before the output layer, in training only
    tie_embeddings: bool = False  # the output layer's weight is the embedding (needs embed_dim == hidden_dim)
    input_dropout: float = 0.0  # on the embedded input, one mask per row for all its positions, in training only

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        for name in ("vocab_size", "embed_dim", "hidden_dim", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("dropout", "input_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.tie_embeddings and self.embed_dim != self.hidden_dim:
            raise ValueError(f"tied embeddings need embed_dim == hidden_dim, got {self.embed_dim} and {self.hidden_dim}")

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Rebuild from a checkpoint's dict; unknown or missing keys are errors, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        d = asdict(self)
        # A checkpoint without these options stays readable by engines older than them.
        for name, off in (("tie_embeddings", False), ("input_dropout", 0.0)):
            if d[name] == off:
                del d[name]
        return d

    @property
    def state_dim(self) -> int:
        return 2 * self.hidden_dim if self.cell == "lstm" else self.hidden_dim


def pick_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; ValueError for a CUDA device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={name} but CUDA is not available")
    return torch.device(name)


class TiedHead(nn.Module):
    """The output layer of a model with tied embeddings: logits = out · embedding weightᵀ + bias. The weight
    is the embedding's own (not a second parameter), so the state dict holds it once, as embed.weight."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "_embed", embed)  # a reference, not a submodule: no second copy in state_dict
        self.bias = nn.Parameter(torch.zeros(embed.num_embeddings))

    @property
    def weight(self) -> torch.Tensor:
        return self._embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._embed.weight, self.bias)


class PoemModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        if config.tie_embeddings:
            # N(0, 1) rows would start the shared output layer with logits of a standard deviation near
            # sqrt(hidden_dim); rows of norm about 1 start it near uniform, as an untied Linear starts.
            nn.init.normal_(self.embed.weight, std=config.embed_dim ** -0.5)
        self.rnn = CELLS[config.cell](
            config.embed_dim,
            config.hidden_dim,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = TiedHead(self.embed) if config.tie_embeddings else nn.Linear(config.hidden_dim, config.vocab_size)

    def num_parameters(self) -> int:
        # A quantized copy (quantize_int8) packs its weights outside parameters(): it keeps the float count.
        return getattr(self, "float_parameters", 0) or sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        """Where the model runs (the embedding is never quantized, so it always has a plain weight)."""
        return self.embed.weight.device

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """A zero state for `batch_size` rows: (num_layers, B, state_dim)."""
        c = self.config
        device = device if device is not None else self.device
        return torch.zeros(c.num_layers, batch_size, c.state_dim, device=device, dtype=self.embed.weight.dtype)

    def _unpack(self, state: torch.Tensor | None):
        if state is None or self.config.cell != "lstm":
            return state
        h, c = state.chunk(2, dim=-1)  # each (L, B, H)
        return h.contiguous(), c.contiguous()

    def _pack(self, state) -> torch.Tensor:
        return torch.cat(state, dim=-1) if self.config.cell == "lstm" else state

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        """tokens (B, T) → logits (B, T, V) and the state after the last position."""
        c = self.config
        x = self.embed(tokens)  # (B, T, E)
        if self.training and c.input_dropout > 0:
            # NOTE: one mask for all of a row's positions (variational dropout, Gal & Ghahramani 2016): a unit
            # of the input is gone for the whole poem, not for one step.
            keep = torch.full((x.shape[0], 1, x.shape[2]), 1.0 - c.input_dropout, device=x.device, dtype=x.dtype)
            x = x * torch.bernoulli(keep) / (1.0 - c.input_dropout)
        out, new_state = self.rnn(x, self._unpack(state))  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, self._pack(new_state)

    def step(self, tokens: torch.Tensor, state: torch.Tensor):
        """One decoding step: tokens (B,) and state (L, B, S) → logits (B, V) and the next state."""
        logits, state = self.forward(tokens.unsqueeze(1), state)
        return logits.squeeze(1), state


class _Step(nn.Module):
    def __init__(self, model: PoemModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, state: torch.Tensor):
        return self.model.step(tokens, state)


def compile_step(model: PoemModel):
    """`model.step` as one TorchScript call, for a thread that steps while other threads run Python.

    Eager `step` is about a dozen ATen calls, and each one gives the GIL up and must take it back: while the
    engine's step loop runs Python on the other core, each of those can wait a whole switch interval, and
    a step beside a busy Python thread takes several times as long. The traced graph runs the same ATen kernels
    (bit-identical outputs, tested) and takes the GIL back only on return, given `kept_step_inputs`. Traced
    once per loaded version, for any batch size; eager `model.step` if tracing fails (torch.jit is
    deprecated and may one day go)."""
    c = model.config
    device = model.device
    tokens = torch.zeros(16, dtype=torch.long, device=device)
    state = model.init_state(16, device)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            # The tracer warns that nn.LSTM's hidden-size check is frozen in: our state always fits it.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Step(model).eval(), (tokens, state), check_trace=False)
            logits, new_state = traced(tokens, state)
        if logits.shape != (16, c.vocab_size) or new_state.shape != state.shape:
            raise RuntimeError(f"traced step gave {tuple(logits.shape)}, {tuple(new_state.shape)}")
    except Exception as e:  # never fatal: the eager step is the same function, only slower beside Python
        log.warning("model.step could not be traced (%s); stepping eagerly", e)
        return model.step
    return traced


def kept_step_inputs(model: PoemModel, rows: int) -> tuple[torch.Tensor, ...]:
    """Input buffers for the compiled step, to copy into and pass at every step of `rows` rows:
    (tokens (rows,), state (L, rows, S), a view of each).

    When the traced step lets go of an input that a Python object wraps and nothing else in C++ holds,
    torch hands the object back to Python, which takes the GIL in the middle of the step, so the step
    waits for whatever Python runs beside it. Ordinary (not inference) tensors that live on, each held
    from C++ by its view's `_base`, are never let go of. Keep all four alive."""
    device = model.device
    with torch.inference_mode(False):
        tokens = torch.zeros(rows, dtype=torch.long, device=device)
        state = model.init_state(rows, device)
        return tokens, state, tokens[:], state[:]


def quantize_int8(model: PoemModel) -> PoemModel:
    """A copy of `model` for a CPU engine (ENGINE_QUANTIZE=int8): the recurrent layers and the output layer
    run as int8 matrix products (torch's dynamic quantization), several times faster on a CPU, for a held-out
    perplexity a few tenths of a per cent higher. NOTE: each step quantizes its inputs with one scale per
    batch, so a row's last bits depend on the rows beside it: the poem of a seeded request can differ alone
    and in a batch, as on a GPU. A tied output layer stays float (it is the embedding)."""
    if model.device.type != "cpu":
        raise ValueError("int8 quantization is for a CPU engine")
    types = {nn.Linear} | ({CELLS[model.config.cell]} if model.config.cell in ("lstm", "gru") else set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), types, dtype=torch.qint8,
                                                           inplace=True)
    quantized.float_parameters = model.num_parameters()
    return quantized
