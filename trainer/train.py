"""The training loop: cross-entropy, Adam or SGD, warm-up + cosine schedule, clipping, early stopping.

    python -m trainer train --corpus ../shared/corpus/chinese-poetry --out runs/lstm --cell lstm \
        --time-budget 30

A run lives in its directory (`--out`): `state.safetensors` + `state.json` (everything needed to resume,
written atomically every `--save-every` seconds), `best.safetensors` (the best model so far, a normal
engine checkpoint), `history.jsonl` and `curves.png`. `--resume` continues a run killed at any moment,
losing at most the time since the last save. `--recipe classic` trains the classic baseline instead:
every poem pre-padded to 125 tokens and the loss taken over all positions.

Data-parallel: `torchrun --nproc-per-node=N -m trainer train …` (detected by WORLD_SIZE > 1) trains with
DistributedDataParallel, gloo on the CPU and nccl on GPUs (rank r on cuda:LOCAL_RANK). `--batch-tokens` (or
`--batch-size`) is per rank: every step takes one global batch of N times that, cut into N disjoint shares,
and the learning rate is scaled by N (linear rule, after the same warm-up). The update equals that of one
process with the N-times batch and N-times learning rate (tests/test_distributed_training.py). Rank 0 alone
evaluates and writes; every rank resumes from the same state.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from engine.files import atomic_write_bytes
from engine.model.checkpoint import save_checkpoint
from engine.model.network import ModelConfig, PoemModel, pick_device
from engine.poem.forms import FORM_NAMES
from engine.poem.vocab import Vocab, is_tune_token
from trainer.corpus import Corpus, CorpusError, load_corpus, split
from trainer.data import CLASSIC_LEN, Buckets, ci_vocab, classic_tensor, poems_of_kind
from trainer.evaluate import encode_rows, perplexity_of_rows
from trainer.pack import load_pack


@dataclass
class TrainConfig:
    corpus: list[str] = field(default_factory=lambda: ["../shared/corpus/chinese-poetry"])
    packed: str = ""  # a `trainer corpus pack` file to train on instead of --corpus (its vocabulary and split)
    out: str = "runs/lstm"
    recipe: str = "bucketed"  # bucketed (ours) | classic (pre-padded to 125, loss everywhere)
    cell: str = "lstm"
    embed_dim: int = 128
    hidden_dim: int = 384
    num_layers: int = 2
    dropout: float = 0.1
    tie_embeddings: bool = False  # the output layer shares the embedding's weight (embed_dim must equal hidden_dim)
    input_dropout: float = 0.0  # on the embedded input, one mask per row (engine.model.network.ModelConfig)
    optimizer: str = "adam"  # adam | sgd
    lr: float = 3e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    batch_tokens: int = 4096  # classic recipe: batch_size poems instead
    batch_size: int = 128
    epochs: int = 10
    time_budget: float = 0.0  # minutes of training: CPU time on a CPU, wall time on a GPU; eval not counted (0: off)
    deadline: float = 0.0  # minutes of wall time for this process's run, evaluations included (0: off)
    max_steps: int = 0  # 0: no limit
    log_every: int = 20  # steps between train-loss rows in history.jsonl
    eval_every: int = 500  # steps; also at the last epoch's end, and at every epoch end when epochs are longer
    eval_poems: int = 2000  # validation poems per evaluation (a fixed subset, for speed)
    patience: int = 4  # evaluations without improvement before stopping
    save_every: float = 120.0  # seconds between resumable saves
    seed: int = 1234
    val_percent: int = 5
    min_count: int = 5
    max_vocab: int = 6000
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"
    half: bool = True  # store best.safetensors in fp16 (half the size; the engine computes in fp32)
    init_from: str = ""  # a checkpoint to fine-tune: its vocabulary and weights start the run (same cell and sizes)
    kind: str = "shi"  # shi: the four regular forms | ci: the Song 词, each opened by its tune's token | all: both
    tune_tokens: int = 80  # ci: the most common tunes get a token of their own (the rest share <ci>)

    def validate(self):
        if self.packed and self.recipe != "bucketed":
            raise ValueError("--packed trains the bucketed recipe only")
        if self.recipe not in ("bucketed", "classic"):
            raise ValueError(f"recipe must be bucketed or classic, got {self.recipe!r}")
        if self.kind not in ("shi", "ci", "all"):
            raise ValueError(f"kind must be shi, ci or all, got {self.kind!r}")
        if self.kind != "shi" and (self.packed or self.recipe != "bucketed"):
            raise ValueError(f"--kind {self.kind} trains the bucketed recipe from --corpus (not --packed, which "
                             f"holds its 词 or not already)")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.lr <= 0 or self.batch_tokens < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError("lr, batch_tokens, batch_size and log_every must be positive")
        self.model_config(vocab_size=1)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model these settings train (ModelConfig checks them)."""
        return ModelConfig(vocab_size=vocab_size, cell=self.cell, embed_dim=self.embed_dim, hidden_dim=self.hidden_dim,
                           num_layers=self.num_layers, dropout=self.dropout, tie_embeddings=self.tie_embeddings,
                           input_dropout=self.input_dropout)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine from lr to lr*min_lr_ratio over `progress` ∈ [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, extra: dict):
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in extra["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})


def read_progress(run_dir: Path) -> dict | None:
    """A run's saved progress: from state.safetensors' header (written with the weights), else state.json."""
    state, state_json = Path(run_dir) / "state.safetensors", Path(run_dir) / "state.json"
    try:
        if state.exists():
            with safe_open(str(state), framework="pt") as f:
                blob = (f.metadata() or {}).get("progress")
            if blob:
                return json.loads(blob)
        return json.loads(state_json.read_text()) if state_json.exists() else None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"--resume: cannot read the saved state in {run_dir} ({e})") from None


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group); (0, 1, False) outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


class Trainer:
    """Holds one run: data, model, optimizer and progress; `run()` trains until a stop rule fires."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print, corpus: Corpus | None = None):
        """`corpus`: an already loaded corpus (the benchmark shares one between two trainers)."""
        cfg.validate()
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        self.rank, self.world, self._owns_group = _init_distributed(self.device)
        self.log = log if self.rank == 0 else (lambda m: None)  # one voice, not N copies of each line
        torch.manual_seed(cfg.seed)

        pack = load_pack(cfg.packed) if cfg.packed else None
        if pack is None:
            corpus = corpus if corpus is not None else load_corpus(cfg.corpus, include_ci=cfg.kind != "shi")
            train_poems, val_poems = split(poems_of_kind(corpus, cfg.kind), cfg.val_percent)
            # A clear line instead of an empty epoch or a NaN perplexity further down.
            if not train_poems:
                what = "词 (get them with: python -m trainer corpus download --include-ci)" if cfg.kind != "shi" \
                    else "regular-form poem"
                raise CorpusError(f"{', '.join(cfg.corpus)}: no {what} to train on")
            if not val_poems:
                raise CorpusError(f"{', '.join(cfg.corpus)}: the validation split is empty "
                                  f"({len(train_poems)} poems; add poems or raise --val-percent)")
        saved = read_progress(self.dir) if resume else None
        if saved is not None:
            self.progress = saved
            saved_cfg = self.progress["config"]
            for key in ("cell", "embed_dim", "hidden_dim", "num_layers", "tie_embeddings", "recipe"):
                used = saved_cfg.get(key, False)  # a run from before tie_embeddings existed: untied
                if used != getattr(cfg, key):
                    raise ValueError(f"--resume: {key} is {getattr(cfg, key)!r} but the run used {used!r}")
            self.vocab = Vocab(self.progress["vocab"])
            init = None  # the saved state already holds the fine-tuned weights
        else:
            self.progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0,
                             "tokens": 0, "best_val_ppl": None, "bad_evals": 0, "done": False,
                             "world_size": self.world}
            init = self._load_init(cfg) if cfg.init_from else None
            # Fine-tuning keeps the checkpoint's vocabulary: token ids are rows of its embedding and head.
            if init and pack and init.vocab.tokens != pack.vocab.tokens:
                raise ValueError(f"--init-from {cfg.init_from} has another vocabulary than {cfg.packed}")
            self.vocab = (init.vocab if init else pack.vocab if pack
                          else Vocab.build((p.text for p in train_poems), cfg.min_count, cfg.max_vocab))
            if cfg.kind != "shi":
                self.vocab = ci_vocab(self.vocab, [p for p in train_poems if p.form == "ci"], cfg.min_count,
                                      cfg.tune_tokens)
        if pack is not None:
            if saved is not None and pack.vocab.tokens != self.vocab.tokens:
                raise ValueError(f"--resume: {cfg.packed} has another vocabulary than the run")
            self.corpus_hash, self.num_train_poems, self.train = pack.corpus_hash, pack.train.num_poems, pack.train
            val_rows = [row.tolist() for t in pack.val.tensors.values() for row in t]
        else:
            self.corpus_hash, self.num_train_poems = corpus.digest(), len(train_poems)
            self.train = Buckets.build(self.vocab, train_poems)
            val_rows = encode_rows(self.vocab, val_poems, pre_pad=cfg.recipe == "classic")
        rng = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(val_rows), generator=rng)[: cfg.eval_poems].tolist()
        self.val_rows = [val_rows[i] for i in sorted(pick)]
        if cfg.recipe == "classic":
            self.classic = classic_tensor(self.vocab, train_poems)
        elif self.device.type == "cuda":
            self.train = self.train.to(self.device)

        self.model_config = cfg.model_config(len(self.vocab))
        self.model = PoemModel(self.model_config).to(self.device)
        if init is not None:
            _load_rows_by_token(self.model, self.vocab, init.model, init.vocab)
            grown = len(self.vocab) - len(init.vocab)
            self.log(f"fine-tuning from {cfg.init_from} (version {init.version})"
                     + (f"; {grown} new tokens" if grown else ""))
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        if saved is not None and (self.dir / "state.safetensors").exists():
            tensors = load_file(str(self.dir / "state.safetensors"))
            self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            _load_optimizer(self.opt, tensors, self.progress["optimizer"])
            self.log(f"resumed at step {self.progress['step']} (epoch {self.progress['epoch']}, "
                     f"{self.progress['train_seconds']:.0f}s trained)")
            if self.rank == 0:
                self._trim_history(self.progress["step"])
        if saved is not None and saved.get("world_size", 1) != self.world:
            # Another world size cuts the epoch into global batches of another size: continue at the same
            # share of the epoch (so not bit-for-bit the interrupted run: that epoch's remaining poems differ).
            old = saved.get("world_size", 1)
            self.progress["batch_in_epoch"] = self.progress["batch_in_epoch"] * old // self.world
            self.progress["world_size"] = self.world
            self.log(f"resuming a {old}-process run with {self.world} processes: batch "
                     f"{self.progress['batch_in_epoch']} of the epoch")
        # Every rank holds the same weights (DDP also broadcasts rank 0's at construction) and the same
        # optimizer state; `self.model` stays the plain module for evaluation and checkpoints.
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # The time budget counts this process's CPU time on a CPU, so runs compared at the same budget
        # got the same compute however busy the machine was; on a GPU it counts wall time.
        self.clock = time.process_time if self.device.type == "cpu" else time.monotonic
        self.wall = time.monotonic  # the deadline's clock (a test may replace it)
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    @staticmethod
    def _load_init(cfg: TrainConfig):
        from engine.model.checkpoint import load_checkpoint

        init = load_checkpoint(cfg.init_from)
        for key in ("cell", "embed_dim", "hidden_dim", "num_layers", "tie_embeddings"):
            if getattr(init.model.config, key) != getattr(cfg, key):
                raise ValueError(f"--init-from: {key} is {getattr(cfg, key)!r} but {cfg.init_from} has "
                                 f"{getattr(init.model.config, key)!r}")
        return init

    # -- persistence ---------------------------------------------------------------------------------
    def _trim_history(self, step: int):
        """Drop history rows the killed run wrote after its last save: those steps are trained again."""
        history = self.dir / "history.jsonl"
        if history.exists():
            rows = [line for line in history.read_text().splitlines() if line.strip()]
            keep = []
            for line in rows:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except ValueError:
                    pass  # a line cut short by the kill
            if len(keep) != len(rows):
                atomic_write_bytes(history, "".join(line + "\n" for line in keep).encode())

    def save_state(self):
        """Everything needed to resume, written atomically (tensors first, then the JSON that points on)."""
        opt_tensors, opt_extra = _optimizer_tensors(self.opt)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors.update(opt_tensors)
        self.progress.update(config=asdict(self.cfg), vocab=self.vocab.tokens, optimizer=opt_extra)
        blob = json.dumps(self.progress, ensure_ascii=False)
        # The progress rides in the tensors' header, so one rename commits both: a kill between two
        # writes can never pair step N's weights with step N-1's counters. state.json is a readable copy.
        atomic_write_bytes(self.dir / "state.safetensors", save(tensors, metadata={"progress": blob}))
        atomic_write_bytes(self.dir / "state.json", blob.encode())

    def save_best(self, metrics: dict):
        meta = {
            "corpus_hash": self.corpus_hash,
            "metrics": metrics,
            "train": {k: v for k, v in asdict(self.cfg).items() if k not in ("out",)}
            | {"train_poems": self.num_train_poems, "tokens_seen": self.progress["tokens"], "world_size": self.world,
               "train_seconds": round(self.progress["train_seconds"], 1), "step": self.progress["step"]},
        }
        save_checkpoint(self.dir / "best.safetensors", self.model, self.vocab, meta, half=self.cfg.half)

    # -- one step --------------------------------------------------------------------------------------
    def _batch_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy over the batch's targets, number of targets)."""
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            logits, _ = self.net(batch[:, :-1])  # (B, T-1, V)
        target = batch[:, 1:]
        # Ours: no padding in the batch, every target counts. Classic: pads are targets too.
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        return loss, target.numel()

    def train_step(self, batch: torch.Tensor, lr: float, global_tokens: int = 0) -> tuple[torch.Tensor, int]:
        """One optimizer step on `batch` (B, T) at learning rate `lr`; returns (mean loss, target tokens).

        Under DDP `batch` is this rank's share of a global batch of `global_tokens` targets; the loss and
        the token count returned are the global batch's.
        """
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_sum, ntok = self._batch_loss(batch)
        global_tokens = global_tokens or ntok * self.world
        # DDP averages gradients over the N ranks: each rank's token sum times N / (global tokens) makes that
        # average exactly the per-token mean over the whole global batch, however unevenly it was shared.
        loss = loss_sum * (self.world / global_tokens)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        loss = loss_sum.detach()
        if self.world > 1:
            dist.all_reduce(loss)  # the global batch's loss, so every rank logs and checks the same number
        loss = loss / global_tokens
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.progress['step']}; lower --lr")
        return loss, global_tokens

    def evaluate(self) -> dict:
        return perplexity_of_rows(self.model, self.vocab, self.val_rows)

    def _epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        return [batch for batch, _ in self._epoch_shares(epoch)]

    def _epoch_shares(self, epoch: int) -> list[tuple[torch.Tensor, int]]:
        """One epoch's global batches as (this rank's rows, target tokens of the whole global batch).

        Every rank draws the same order from the seed, with batches N times the per-rank size, and takes
        the r-th of N contiguous slices of each; one process (N = 1) takes all of it, as before.
        """
        seed = self.cfg.seed * 1000 + epoch
        if self.cfg.recipe == "classic":
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(self.classic.shape[0], generator=g)
            bs = self.cfg.batch_size * self.world
            return [(self.classic[rows.tensor_split(self.world)[self.rank]], len(rows) * (CLASSIC_LEN - 1))
                    for rows in (perm[i : i + bs] for i in range(0, len(perm), bs))]
        # A share may hold a row fewer than another (or none, in a tiny tail batch): the loss weighting in
        # train_step keeps the update exact all the same.
        return [(self.train.get(form, rows.tensor_split(self.world)[self.rank]),
                 len(rows) * (self.train.tensors[form].shape[1] - 1))
                for form, rows in self.train.batches(self.cfg.batch_tokens * self.world, seed)]

    def _sync_seconds(self, seconds: float) -> float:
        """The mean of the ranks' step times: every rank must see the same clock, or the time budget and the
        cosine schedule would stop or steer them apart."""
        if self.world == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, progress_bar: bool = True) -> dict:
        from tqdm import tqdm

        cfg, p = self.cfg, self.progress
        budget_s = cfg.time_budget * 60
        # NOTE: the deadline is for a machine lent for minutes: unlike the time budget it counts evaluations
        # and saves, so the cosine reaches its floor and the run stops inside the lease.
        deadline_s, started = cfg.deadline * 60, self.wall()
        history = self.dir / "history.jsonl"
        last_save = time.monotonic()
        stop_reason = None
        self.model.train()
        while p["epoch"] < cfg.epochs and not p["done"]:
            batches = self._epoch_shares(p["epoch"])
            bar = tqdm(total=len(batches), initial=p["batch_in_epoch"], disable=not progress_bar or self.rank != 0,
                       desc=f"epoch {p['epoch'] + 1}/{cfg.epochs}", dynamic_ncols=True, mininterval=2)
            window_t, window_tok = time.monotonic(), 0
            while p["batch_in_epoch"] < len(batches):
                t0 = self.clock()
                progress = max(p["step"] / cfg.max_steps if cfg.max_steps else 0.0,
                               p["train_seconds"] / budget_s if budget_s else 0.0,
                               (self.wall() - started) / deadline_s if deadline_s else 0.0,
                               (p["epoch"] + p["batch_in_epoch"] / len(batches)) / cfg.epochs)
                batch, global_tokens = batches[p["batch_in_epoch"]]
                # Linear scaling: N times the batch, N times the learning rate (warm-up included).
                loss, ntok = self.train_step(batch, lr_at(cfg, p["step"], progress) * self.world, global_tokens)
                p["step"] += 1
                p["batch_in_epoch"] += 1
                p["tokens"] += ntok
                p["train_seconds"] += self._sync_seconds(self.clock() - t0)
                window_tok += ntok
                bar.update(1)
                if p["step"] % cfg.log_every == 0 and self.rank == 0:
                    rate = window_tok / max(1e-9, time.monotonic() - window_t)
                    bar.set_postfix(loss=f"{loss.item():.3f}", ppl=f"{math.exp(min(20, loss.item())):.1f}",
                                    tok_s=f"{rate:.0f}", lr=f"{self.opt.param_groups[0]['lr']:.1e}")
                    window_t, window_tok = time.monotonic(), 0
                    with history.open("a") as f:
                        f.write(json.dumps({"step": p["step"], "train_loss": loss.item(),
                                            "train_seconds": round(p["train_seconds"], 2)}) + "\n")
                if cfg.max_steps and p["step"] >= cfg.max_steps:
                    stop_reason = "max_steps"
                elif budget_s and p["train_seconds"] >= budget_s:
                    stop_reason = "time_budget"
                elif deadline_s and self.wall() - started >= deadline_s:
                    stop_reason = "deadline"
                if p["step"] % cfg.eval_every == 0 or stop_reason:
                    stop_reason = self._evaluate_and_keep(history) or stop_reason
                if stop_reason:
                    break
                if time.monotonic() - last_save >= cfg.save_every and self.rank == 0:
                    self.save_state()
                    last_save = time.monotonic()
            bar.close()
            if stop_reason:
                break
            p["epoch"] += 1
            p["batch_in_epoch"] = 0
            # NOTE: a short epoch (a GPU's 65,536-token batches make 157 steps of one) is no reason to
            # evaluate: eval_every decides, and the last epoch's end still keeps the best checkpoint.
            if len(batches) > cfg.eval_every or p["epoch"] >= cfg.epochs:
                stop_reason = self._evaluate_and_keep(history)
            if stop_reason:
                break
        p["done"] = True
        p["stop_reason"] = stop_reason or "epochs"
        if self.rank == 0:
            self.save_state()
            plot_curves(history, self.dir / "curves.png")
        if self.world > 1:
            dist.barrier()  # the final state is on disk before any rank (and so torchrun) exits
            if self._owns_group:
                dist.destroy_process_group()
        self.log(f"stopped ({p['stop_reason']}) after {p['step']} steps, {p['tokens']} tokens, "
                 f"{p['train_seconds']:.0f}s; best validation ppl {p['best_val_ppl']}")
        return p

    def _evaluate_and_keep(self, history: Path) -> str | None:
        """Rank 0 evaluates, keeps the best and saves; every rank gets its verdict (so all stop together)."""
        p = self.progress
        stop = self._evaluate_and_keep_here(history) if self.rank == 0 else None
        if self.world > 1:
            shared = [stop, p["best_val_ppl"], p["bad_evals"]]
            dist.broadcast_object_list(shared, src=0)
            stop, p["best_val_ppl"], p["bad_evals"] = shared
        return stop

    def _evaluate_and_keep_here(self, history: Path) -> str | None:
        metrics = self.evaluate()
        p = self.progress
        with history.open("a") as f:
            f.write(json.dumps({"step": p["step"], "val_ppl": metrics["ppl"], "val_nll": metrics["nll"],
                                "train_seconds": round(p["train_seconds"], 2)}) + "\n")
        self.log(f"step {p['step']}: validation ppl {metrics['ppl']:.2f} over {metrics['chars']} characters")
        if p["best_val_ppl"] is None or metrics["ppl"] < p["best_val_ppl"]:
            p["best_val_ppl"] = metrics["ppl"]
            p["bad_evals"] = 0
            self.save_best({"val_ppl": round(metrics["ppl"], 4), "val_nll": round(metrics["nll"], 6),
                            "val_chars": metrics["chars"], "val_oov": metrics["oov"]})
        else:
            p["bad_evals"] += 1
        self.save_state()
        if p["bad_evals"] >= self.cfg.patience:
            return "early_stopping"
        return None


@torch.no_grad()
def _load_rows_by_token(model: PoemModel, vocab: Vocab, init: PoemModel, init_vocab: Vocab) -> None:
    """`init`'s weights into `model`, whose vocabulary may hold more tokens: shared tokens keep their rows.
    A new character starts from the mean embedding with a low output bias; a tune token starts from the
    mean of the form tokens' embeddings (it plays their part)."""
    state = {k: v.clone() for k, v in init.state_dict().items()}
    if vocab.tokens == init_vocab.tokens:
        model.load_state_dict(state)
        return
    own = model.state_dict()
    old_ids = [init_vocab.index.get(t, -1) for t in vocab.tokens]
    known = torch.tensor([i >= 0 for i in old_ids])
    src = torch.tensor([max(i, 0) for i in old_ids])
    forms = torch.tensor([init_vocab.form_id(f) for f in FORM_NAMES])
    for key in ("embed.weight", "head.weight", "head.bias"):
        if key not in state:  # tied embeddings: the head's weight is embed.weight
            continue
        old = state[key]
        new = old[src].clone()
        if key == "embed.weight":
            new[~known] = old[init_vocab.first_han_id:init_vocab.end_han_id].mean(dim=0)
            tunes = torch.tensor([is_tune_token(t) and not known[i] for i, t in enumerate(vocab.tokens)])
            new[tunes] = old[forms].mean(dim=0)
        elif key == "head.weight":
            new[~known] = 0
        else:
            new[~known] = old[init_vocab.first_han_id:init_vocab.end_han_id].min()
        state[key] = new.to(own[key].dtype)
    model.load_state_dict(state)


def plot_curves(history: Path, out: Path):
    """Training loss and validation loss (nats per character) against training seconds."""
    if not history.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    train = [(r["train_seconds"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["train_seconds"], r["val_nll"]) for r in rows if "val_nll" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation nll")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("nats per token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def config_from_args(args: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in args.items() if k in known and v is not None})
