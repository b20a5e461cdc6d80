"""`python -m mansu demo`: build the demo world and model when missing, print base accuracies."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the demo world and model (cached) and print base accuracies",
                              description="Generate the fictitious demo knowledge base and train the demo Llama on "
                                          "the CPU (about a minute on 2 cores) under $MANSU_HOME/demo, unless it is "
                                          "already there; then print cloze accuracies on forget, retain and probe.")
    p.add_argument("--rebuild", action="store_true", help="delete the cached demo and build it again")
    p.add_argument("--json", action="store_true", help="print the accuracies as one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil

    from tqdm import tqdm

    from mansu.metrics.accuracy import mcq_accuracy
    from mansu.models.demo import demo_assets, ensure_demo, load_demo_split
    from mansu.models.loading import load_model

    if args.rebuild:
        shutil.rmtree(demo_assets().root, ignore_errors=True)
    with tqdm(total=None, desc="training demo model", unit="epoch", disable=None) as bar:
        def progress(epoch: int, total: int, info: dict) -> None:
            bar.total = total
            bar.n = epoch
            bar.set_postfix({k: round(v, 3) for k, v in info.items()})
        assets = ensure_demo(progress=progress)
    lm = load_model(assets.model_dir)
    results = {split: mcq_accuracy(lm.model, lm.tokenizer, load_demo_split(assets, split)).to_dict()
               for split in ("forget", "retain", "probe")}
    if args.json:
        print(json.dumps({s: {k: v for k, v in r.items() if k != "correct"} for s, r in results.items()}))
    else:
        print(f"demo world and model in {assets.root}")
        for split, r in results.items():
            print(f"  {split:<7} cloze accuracy {r['accuracy']:.3f}  (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}, n={r['n']})")
    return 0
