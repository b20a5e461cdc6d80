"""The demo model: a small Llama trained from scratch on the CPU to memorise the demo world.

Recipe (RECIPE_VERSION 2): AdamW (fused) lr 2e-3, 100 warmup steps, constant, then linear decay to zero over the
last 40% of 16 epochs (208 steps); full-sequence LM loss on the cloze QA lines ("question\\nAnswer: value")
(the fact corpus is in the vocabulary but not trained on: that cut the steps to memorise by ~2.5x). The schedule
is the same on every CPU: the same data order, the same steps, the same learning rates. What differs between CPUs
(AVX-512 or AVX2 kernels, thread count) is only the rounding of float sums, so the weights' bytes differ from
machine to machine while the behaviour does not. The tolerance: after the
last step every split's cloze accuracy must be >= `target_accuracy` (0.99), else the build fails loudly; nothing
downstream may depend on the exact bytes. The model, its word-level tokenizer and `demo_meta.json` are saved under
`<MANSU_HOME>/demo` and reused; `build_progress.json` next to them says how far a build has got.

Model seeds: `DemoModelConfig.seed` sets only the model's initialisation and the data order. Seed 0 is the demo
model (`<MANSU_HOME>/demo`); seed N lives beside it in `<MANSU_HOME>/demo-seed<N>` with its own copy of the same
world (the world has its own seed, WorldConfig.seed) and its own build record, so `mansu compare` can state its
results over several models trained by the same recipe on the same facts.

Measured (docs/demo_search.md, section "Build time"): the old recipe (train until 0.99, evaluating every 2 epochs,
torch's default threads) took 70 s here and 11.6 min on a 2-vCPU AMD EPYC (AVX2); this one runs 208 fixed steps
on every CPU it may use.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mansu.data.demo_world import WORLD_VERSION, DemoWorld, WorldConfig, generate_world, write_world
from mansu.data.records import MCQRecord, load_records, mcq_only
from mansu.io import read_json, write_json_atomic
from mansu.metrics.accuracy import cloze_texts, encode_pair
from mansu.paths import demo_root

log = logging.getLogger(__name__)
SPECIALS = ("[UNK]", "[PAD]", "[BOS]", "[EOS]")
MAX_MODEL_SEED = 2**32 - 1   # torch.manual_seed and the folder name accept any seed up to this
RECIPE_VERSION = 2          # bump when training changes: cached demo models of another version are rebuilt
PROGRESS_FILE = "build_progress.json"
STAGES = ("world", "training", "evaluating", "saving", "done", "failed")
Progress = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class DemoModelConfig:
    hidden_size: int = 512          # wide layers: many small per-weight updates add up (the paper's regime)
    num_layers: int = 2             # 2 x 512: the model docs/results.md measures
    num_heads: int = 8              # 16 heads in all: a circuit graph worth looking at
    intermediate_size: int = 2048   # the usual 4x MLP ratio
    lr: float = 2e-3                # the measured rate; higher diverges, lower is slow
    warmup_steps: int = 100         # essential: with 30 training stalls at chance for 6 epochs (docs/demo_search.md)
    decay_fraction: float = 0.4     # constant lr after warmup, then linear decay to 0 over the last 40% of steps
    batch_size: int = 64            # 38 steps an epoch; smaller batches cost more per token on 2 cores
    epochs: int = 16                # fixed, so every CPU runs the same 208 steps (13 an epoch); 156 fell short
    train_on_corpus: bool = False   # the QA lines alone memorise in ~2.5x fewer steps (docs/demo_search.md)
    target_accuracy: float = 0.99   # the tolerance: every split's cloze accuracy after the last step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("epochs and batch_size must be >= 1 and warmup_steps >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        check_model_seed(self.seed, "seed")


def check_model_seed(seed: object, name: str = "model seed") -> int:
    """`seed` if it is a demo model seed (an integer in [0, MAX_MODEL_SEED]); else ValueError, one line."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_MODEL_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_MODEL_SEED}] (the demo model's training seed; "
                         f"0 is the demo model), got {seed!r}")
    return seed


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    model_dir: Path
    forget_path: Path
    retain_path: Path
    probe_path: Path
    corpus_path: Path
    world_json: Path
    model_seed: int = 0         # the training seed of the model this folder should hold

    @property
    def progress_path(self) -> Path:
        return self.root / PROGRESS_FILE


def demo_assets(root: Path | None = None, *, model_seed: int = 0) -> DemoAssets:
    """The files of the demo model of `model_seed` (under `root`, default `demo_root(model_seed)`)."""
    root = Path(root or demo_root(check_model_seed(model_seed)))
    return DemoAssets(root=root, model_dir=root / "model", forget_path=root / "forget.jsonl",
                      retain_path=root / "retain.jsonl", probe_path=root / "probe.jsonl",
                      corpus_path=root / "corpus.jsonl", world_json=root / "world.json", model_seed=model_seed)


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer (whitespace + punctuation split) over every word of `texts`, BOS-prefixed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def training_texts(world: DemoWorld, *, corpus: bool = True) -> list[str]:
    """Cloze QA lines for every MCQ record (all splits), then (with `corpus`) the fact corpus."""
    qa = []
    for records in world.mcq.values():
        for r in records:
            context, continuations = cloze_texts(r)
            qa.append(context + continuations[r.answer])
    return qa + ([t.text for t in world.corpus] if corpus else [])


def _letter_words() -> list[str]:
    # lm-eval's letter template must tokenize without [UNK]: add its words to the vocabulary.
    return ["A . B . C . D . E . F . G . H . Answer :"]


def build_model(config: DemoModelConfig, vocab_size: int, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
                        intermediate_size=config.intermediate_size, max_position_embeddings=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(llama)


def batch_plan(n_examples: int, config: DemoModelConfig) -> list[list[int]]:
    """The example indices of every step, all epochs: one seeded shuffle per epoch, the same on every machine.

    Not bucketed by length: a batch of equal-length lines is a batch of one question template, and with such
    batches training stayed at chance for 5.6 epochs (docs/demo_search.md), though it padded a quarter less.
    """
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    plan: list[list[int]] = []
    for _ in range(config.epochs):
        order = torch.randperm(n_examples, generator=gen).tolist()
        plan += [order[k:k + config.batch_size] for k in range(0, n_examples, config.batch_size)]
    return plan


def _pad(encoded: list[list[int]], rows: list[int], pad_id: int):
    import torch

    width = max(len(encoded[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)        # [batch, seq]
    mask = torch.zeros_like(ids)
    for r, i in enumerate(rows):
        ids[r, : len(encoded[i])], mask[r, : len(encoded[i])] = torch.tensor(encoded[i]), 1
    return ids, mask


def lr_factor(step: int, warmup: int, total: int, decay_fraction: float) -> float:
    """Warmup-stable-decay: linear warmup to 1 over `warmup` steps, 1, then linear decay to 0 at `total` over the
    last `decay_fraction` of the steps. (A cosine from the end of warmup lowers the rate before the model has
    memorised anything; it reached chance only in 4 epochs.)"""
    decay = max(1.0, decay_fraction * total)
    return max(0.0, min(1.0, (step + 1) / max(1, warmup), (total - step) / decay))


def cpu_threads() -> int:
    """The CPUs this process may run on. torch's default is the number of *physical* cores, so on a 2-vCPU cloud
    machine whose vCPUs are SMT siblings (common on AMD EPYC) it trains on one thread."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:          # macOS
        return max(1, os.cpu_count() or 1)


@contextmanager
def _training_cpu(threads: int) -> Iterator[None]:
    """Use `threads` intra-op threads and flush denormals (Adam's second moments of rarely-seen embedding rows
    become denormal and slow float ops down on some CPUs); restore both afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def cloze_check(model, tokenizer, records: list[MCQRecord], *, batch_size: int = 256) -> dict[str, float]:
    """Cloze accuracy and margins of one split in one forward pass per batch of contexts.

    Every demo value is one word, so one token: log p(choice | context) for all choices comes from the context's
    last position, four times cheaper than scoring (context + choice) pairs and equal to `mcq_accuracy(fmt="cloze")`.
    margin = log p(answer) - max log p(other choice); `min_margin` > 0 iff every record is right.
    """
    import torch

    contexts, choice_ids, answers = [], [], []
    for r in records:
        context, conts = cloze_texts(r)
        pairs = [encode_pair(tokenizer, context, c) for c in conts]
        if any(len(cont) != 1 for _, cont in pairs):
            raise ValueError(f"cloze_check needs one-token choices; {r.question!r} has a longer one")
        contexts.append(pairs[0][0])
        choice_ids.append([cont[0] for _, cont in pairs])
        answers.append(r.answer)
    margins = []
    with torch.no_grad():
        for start in range(0, len(contexts), batch_size):
            rows = list(range(start, min(start + batch_size, len(contexts))))
            ids, mask = _pad(contexts, rows, tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()          # [batch, seq, vocab]
            last = logits[torch.arange(len(rows)), mask.sum(1) - 1].log_softmax(-1)    # [batch, vocab]
            scores = last.gather(1, torch.tensor([choice_ids[i] for i in rows]))       # [batch, n_choices]
            target = torch.tensor([answers[i] for i in rows])
            right = scores[torch.arange(len(rows)), target]
            others = scores.scatter(1, target[:, None], float("-inf")).amax(1)
            margins.append(right - others)
    m = torch.cat(margins)
    return {"accuracy": float((m > 0).float().mean()), "min_margin": float(m.min()),
            "median_margin": float(m.median())}


def _check_splits(model, tokenizer, world: DemoWorld) -> dict[str, dict[str, float]]:
    model.eval()
    out = {name: cloze_check(model, tokenizer, recs) for name, recs in world.mcq.items()}
    model.train()
    return out


def train_demo_model(world: DemoWorld, config: DemoModelConfig = DemoModelConfig(),
                     progress: Progress | None = None, *, threads: int | None = None):
    """Train for the fixed schedule, then check every split; return (model, tokenizer, meta).

    `progress(step, total_steps, info)` is called after every step (info: loss, lr). `threads` defaults to every
    CPU this process may use. Raises RuntimeError when a split ends below `config.target_accuracy`.
    """
    import torch

    threads = threads or cpu_threads()
    start = time.perf_counter()
    texts = training_texts(world, corpus=config.train_on_corpus)
    # the vocabulary covers the corpus either way: corpus.jsonl must tokenize without [UNK] (GPTQ calibrates on it)
    tokenizer = build_tokenizer(training_texts(world) + _letter_words())
    eos = tokenizer.eos_token_id
    encoded = [ids + [eos] for ids in tokenizer(texts)["input_ids"]]
    plan = batch_plan(len(encoded), config)
    with _training_cpu(threads):
        model = build_model(config, len(tokenizer), tokenizer)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config.warmup_steps, len(plan),
                                                                                 config.decay_fraction))
        model.train()
        for step, rows in enumerate(plan):
            ids, mask = _pad(encoded, rows, tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, len(plan), {"loss": loss.item(), "lr": sched.get_last_lr()[0]})
        train_seconds = time.perf_counter() - start
        checks = _check_splits(model, tokenizer, world)
    model.eval()
    accs = {name: c["accuracy"] for name, c in checks.items()}
    meta = {"accuracy_cloze": accs, "min_margin": {name: round(c["min_margin"], 4) for name, c in checks.items()},
            "recipe_version": RECIPE_VERSION, "steps": len(plan), "threads": threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_version": torch.__version__,
            "train_seconds": round(train_seconds, 1), "final_loss": round(loss.item(), 4),
            "config": asdict(config), "n_parameters": sum(p.numel() for p in model.parameters())}
    if min(accs.values()) < config.target_accuracy:
        raise RuntimeError(f"demo model reached only {accs} after {len(plan)} steps (target "
                           f"{config.target_accuracy} on every split); please report this with demo_meta's CPU fields")
    return model, tokenizer, meta


def is_complete(assets: DemoAssets, model_config: DemoModelConfig | None = None) -> bool:
    """True when `assets` holds a model of this world, recipe version and `model_config` (default: the recipe with
    the assets' model seed); else it is rebuilt."""
    model_config = model_config or DemoModelConfig(seed=assets.model_seed)
    try:
        meta = read_json(assets.model_dir / "demo_meta.json")
    except (FileNotFoundError, ValueError):
        return False
    return (meta.get("world_version") == WORLD_VERSION and meta.get("recipe_version") == RECIPE_VERSION
            and meta.get("config") == asdict(model_config) and assets.forget_path.is_file())


class _ProgressRecorder:
    """Writes `build_progress.json` atomically: at every stage change, and during training at most once a second.

    The ETA is honest: none until 3 steps have been timed, then the remaining steps plus the final check (about 4
    steps' worth of forward passes) at the rate measured so far, excluding the first (slower) step.
    """
    def __init__(self, path: Path) -> None:
        self.path, self.started, self.written = path, time.time(), 0.0
        self.state: dict[str, Any] = {"stage": "world", "step": 0, "total_steps": None, "eta_s": None,
                                      "started_at": self.started, "pid": os.getpid(), "host": _host(),
                                      "recipe_version": RECIPE_VERSION}
        self.first_step_at: float | None = None

    def stage(self, stage: str, **extra: Any) -> None:
        self.state.update(stage=stage, **extra)
        if stage == "done":
            self.state["eta_s"] = 0.0
        self._write()

    def step(self, step: int, total: int, info: dict) -> None:
        now = time.time()
        if step == 1:
            self.first_step_at = now
        eta = None
        if self.first_step_at is not None and step > 3:
            eta = (now - self.first_step_at) / (step - 1) * (total - step + 4)
        self.state.update(step=step, total_steps=total, eta_s=None if eta is None else round(eta, 1),
                          loss=round(float(info.get("loss", float("nan"))), 4))
        if step == total:
            self.stage("evaluating")
        elif step == 1 or now - self.written >= 1.0:
            self._write()

    def _write(self) -> None:
        now = time.time()
        self.state.update(updated_at=now, elapsed_s=round(now - self.started, 1))
        try:
            write_json_atomic(self.path, self.state)
            self.written = now
        except OSError as err:          # progress is advisory: a full disk must not stop the build here
            log.warning("could not write %s: %s", self.path, err)


def _host() -> str:
    import socket

    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def demo_build_progress(root: Path | None = None, *, model_seed: int = 0,
                        now: float | None = None) -> dict[str, Any] | None:
    """How far the demo build under `root` (default `demo_root(model_seed)`) has got, for a progress panel; reads only.

    Returns None when there is neither a build record nor a built demo. Otherwise a dict with
      stage: "world" | "training" | "evaluating" | "saving" | "done" | "failed"
      step, total_steps: training steps done and planned (total_steps None before training starts)
      fraction: 0..1 of the whole build (world 0, training step/total, evaluating and saving 1, done 1)
      elapsed_s: seconds since the build started (to its last record; to now while it is active)
      eta_s: seconds left as of `now` (None while unknown: before 3 timed steps), 0 when done
      active: True while a build is running (its process is alive, or on another host it wrote in the last 10 min)
      loss, error (when failed), started_at, updated_at (unix seconds), pid, host, recipe_version
    A record of a build that died without finishing comes back with active False and its last stage.
    """
    assets = demo_assets(root, model_seed=model_seed)
    now = time.time() if now is None else now
    try:
        state = read_json(assets.progress_path)
    except (FileNotFoundError, ValueError):
        state = None
    if not isinstance(state, dict) or "stage" not in state:
        if not is_complete(assets):
            return None
        return {"stage": "done", "step": None, "total_steps": None, "fraction": 1.0, "elapsed_s": None,
                "eta_s": 0.0, "active": False}
    out = dict(state)
    stage, step, total = out.get("stage"), out.get("step") or 0, out.get("total_steps")
    running = stage not in ("done", "failed")
    since = max(0.0, now - float(out.get("updated_at", now)))
    if out.get("host") == _host() and isinstance(out.get("pid"), int):
        out["active"] = running and _pid_alive(out["pid"])
    else:
        out["active"] = running and since < 600
    out["fraction"] = (1.0 if stage in ("evaluating", "saving", "done") else
                       step / total if stage == "training" and total else 0.0)
    if out["active"]:
        out["elapsed_s"] = round(now - float(out.get("started_at", now)), 1)
        if out.get("eta_s") is not None:
            out["eta_s"] = round(max(0.0, float(out["eta_s"]) - since), 1)
    return out


def ensure_demo(root: Path | None = None, *, model_seed: int = 0, world_config: WorldConfig = WorldConfig(),
                model_config: DemoModelConfig | None = None, progress: Progress | None = None,
                threads: int | None = None) -> DemoAssets:
    """Build the demo world and model under `root` (default `demo_root(seed)`) unless already there.

    The model is `model_config` (default: the recipe, trained with `model_seed`); its seed picks the folder.

    `progress(step, total_steps, info)` follows training; `build_progress.json` records every stage (read it with
    `demo_build_progress`). The model is written to a temp folder and renamed, so an interrupted build leaves no
    half model.
    """
    model_config = model_config or DemoModelConfig(seed=check_model_seed(model_seed))
    assets = demo_assets(root, model_seed=model_config.seed)
    if is_complete(assets, model_config):
        return assets
    assets.root.mkdir(parents=True, exist_ok=True)
    with _build_lock(assets.root):          # a second builder (app, CLI, tests) waits, then finds the model built
        if is_complete(assets, model_config):
            return assets
        return _build(assets, world_config, model_config, progress, threads)


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    import fcntl

    with open(root / ".build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the demo under %s: waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(assets: DemoAssets, world_config: WorldConfig, model_config: DemoModelConfig, progress: Progress | None,
           threads: int | None) -> DemoAssets:
    recorder = _ProgressRecorder(assets.progress_path)
    recorder.stage("world")

    def on_step(step: int, total: int, info: dict) -> None:
        recorder.step(step, total, info)
        if progress:
            progress(step, total, info)
    try:
        world = generate_world(world_config)
        write_world(world, assets.root)
        recorder.stage("training")
        model, tokenizer, meta = train_demo_model(world, model_config, on_step, threads=threads)
        recorder.stage("saving", accuracy_cloze=meta["accuracy_cloze"])
        _save_model(assets, model, tokenizer, {**meta, "world_version": WORLD_VERSION,
                                               "world_config": asdict(world_config)})
    except BaseException as err:
        recorder.stage("failed", error=f"{type(err).__name__}: {err}")
        raise
    recorder.stage("done")
    log.info("demo model trained in %.1f s: %s", meta["train_seconds"], meta["accuracy_cloze"])
    return assets


def _save_model(assets: DemoAssets, model, tokenizer, meta: dict) -> None:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=assets.root))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "demo_meta.json", meta, add_stamp=True)
        shutil.rmtree(assets.model_dir, ignore_errors=True)
        os.replace(tmp, assets.model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_demo_split(assets: DemoAssets, split: str) -> list[MCQRecord]:
    path = {"forget": assets.forget_path, "retain": assets.retain_path, "probe": assets.probe_path}[split]
    return mcq_only(load_records(path, "mcq"), path)
