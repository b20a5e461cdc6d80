"""The demo model: a small Llama trained from scratch on the CPU to memorise the demo world.

Recipe (measured on 2 cores): AdamW lr 2e-3, linear warmup then cosine decay (without warmup it
stalls), full-sequence LM loss on the cloze QA lines ("question\\nAnswer: value") and the fact corpus,
until cloze MCQ accuracy on forget, retain and probe is >= `target_accuracy`. The model, its
word-level tokenizer and `demo_meta.json` are saved under `<MANSU_HOME>/demo` and reused.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mansu.data.demo_world import WORLD_VERSION, DemoWorld, WorldConfig, generate_world, write_world
from mansu.data.records import MCQRecord
from mansu.paths import demo_root

log = logging.getLogger(__name__)
SPECIALS = ("[UNK]", "[PAD]", "[BOS]", "[EOS]")


@dataclass(frozen=True)
class DemoModelConfig:
    hidden_size: int = 512          # wide layers: many small per-weight updates add up (the paper's regime)
    num_layers: int = 2             # 2 x 512 memorises 800 facts in ~30 s on 2 cores
    num_heads: int = 8              # 16 heads in all: a circuit graph worth looking at
    intermediate_size: int = 2048   # the usual 4x MLP ratio
    lr: float = 2e-3                # the measured rate; higher diverges, lower is slow
    warmup_steps: int = 100         # essential: without warmup training stalls
    batch_size: int = 64
    max_epochs: int = 60            # an upper bound; training stops once the target accuracy is reached
    target_accuracy: float = 0.99   # the bar on forget and retain
    seed: int = 0


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    model_dir: Path
    forget_path: Path
    retain_path: Path
    probe_path: Path
    corpus_path: Path
    world_json: Path


def demo_assets(root: Path | None = None) -> DemoAssets:
    root = Path(root or demo_root())
    return DemoAssets(root=root, model_dir=root / "model", forget_path=root / "forget.jsonl",
                      retain_path=root / "retain.jsonl", probe_path=root / "probe.jsonl",
                      corpus_path=root / "corpus.jsonl", world_json=root / "world.json")


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


def training_texts(world: DemoWorld) -> list[str]:
    """Cloze QA lines for every MCQ record (all splits) plus the fact corpus."""
    from mansu.metrics.accuracy import cloze_texts

    qa = []
    for records in world.mcq.values():
        for r in records:
            context, continuations = cloze_texts(r)
            qa.append(context + continuations[r.answer])
    return qa + [t.text for t in world.corpus]


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


def _batches(encoded: list[list[int]], batch_size: int, pad_id: int, gen):
    import torch

    order = torch.randperm(len(encoded), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        seqs = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        yield ids, mask


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return schedule


def _split_accuracies(model, tokenizer, world: DemoWorld) -> dict[str, float]:
    from mansu.metrics.accuracy import mcq_accuracy

    model.eval()
    out = {name: mcq_accuracy(model, tokenizer, recs, fmt="cloze", batch_size=256, n_boot=10).accuracy
           for name, recs in world.mcq.items()}
    model.train()
    return out


def train_demo_model(world: DemoWorld, config: DemoModelConfig = DemoModelConfig(),
                     progress: Callable[[int, int, dict], None] | None = None):
    """Train until every split's cloze accuracy reaches the target; return (model, tokenizer, meta)."""
    import torch

    start = time.perf_counter()
    texts = training_texts(world)
    tokenizer = build_tokenizer(texts + _letter_words())
    model = build_model(config, len(tokenizer), tokenizer)
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.max_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, total // 2))
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    accs: dict[str, float] = {}
    for epoch in range(config.max_epochs):
        for ids, mask in _batches(encoded, config.batch_size, tokenizer.pad_token_id, gen):
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch >= 5 and epoch % 2 == 1:
            accs = _split_accuracies(model, tokenizer, world)
            if progress:
                progress(epoch + 1, config.max_epochs, {"loss": loss.item(), **accs})
            if min(accs.values()) >= config.target_accuracy:
                break
    model.eval()
    meta = {"accuracy_cloze": accs, "epochs": epoch + 1, "train_seconds": round(time.perf_counter() - start, 1),
            "config": asdict(config), "n_parameters": sum(p.numel() for p in model.parameters())}
    if min(accs.values(), default=0.0) < config.target_accuracy:
        raise RuntimeError(f"demo model reached only {accs} after {config.max_epochs} epochs "
                           f"(target {config.target_accuracy}); raise max_epochs")
    return model, tokenizer, meta


def _is_complete(assets: DemoAssets) -> bool:
    from mansu.io import read_json

    try:
        meta = read_json(assets.model_dir / "demo_meta.json")
    except (FileNotFoundError, ValueError):
        return False
    return meta.get("world_version") == WORLD_VERSION and assets.forget_path.is_file()


def ensure_demo(root: Path | None = None, *, world_config: WorldConfig = WorldConfig(),
                model_config: DemoModelConfig = DemoModelConfig(),
                progress: Callable[[int, int, dict], None] | None = None) -> DemoAssets:
    """Build the demo world and model under `root` (default <MANSU_HOME>/demo) unless already there.

    The model is written to a temp folder and renamed, so an interrupted build leaves no half model.
    """
    import os
    import shutil
    import tempfile

    from mansu.io import write_json_atomic

    assets = demo_assets(root)
    if _is_complete(assets):
        return assets
    assets.root.mkdir(parents=True, exist_ok=True)
    world = generate_world(world_config)
    write_world(world, assets.root)
    model, tokenizer, meta = train_demo_model(world, model_config, progress)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=assets.root))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "demo_meta.json", {**meta, "world_version": WORLD_VERSION,
                                                   "world_config": asdict(world_config)}, add_stamp=True)
        shutil.rmtree(assets.model_dir, ignore_errors=True)
        os.replace(tmp, assets.model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("demo model trained in %.1f s: %s", meta["train_seconds"], meta["accuracy_cloze"])
    return assets


def load_demo_split(assets: DemoAssets, split: str) -> list[MCQRecord]:
    from mansu.data.records import load_records, mcq_only

    path = {"forget": assets.forget_path, "retain": assets.retain_path, "probe": assets.probe_path}[split]
    return mcq_only(load_records(path, "mcq"), path)
