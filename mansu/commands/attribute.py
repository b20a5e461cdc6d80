"""`python -m mansu attribute`: the EAP-IG attribution graph and the smallest faithful circuit of any model on
forget-set records of any shape (MCQ, QA, text; mansu.attribution.data), without unlearning. Writes a run folder
(kind "attribution") that the app's Circuit page opens,
with the graph, the circuit, its parameter masks and a circuit-tracer export."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mansu.attribution.circuit import smallest_faithful_circuit
from mansu.attribution.data import CORRUPTION_KINDS, LEGACY_KINDS, prepare_prompts, resolve_kind
from mansu.attribution.eap import attribute
from mansu.attribution.serialize import save_circuit, save_graph
from mansu.choices import DEVICES, DTYPES
from mansu.data.records import load_records
from mansu.data.templates import DEFAULT_TEMPLATE, PRESETS, check_template
from mansu.metrics.scoring import check_renders
from mansu.models.demo import ensure_demo
from mansu.models.loading import load_model
from mansu.runs.store import create_run, write_status
from mansu.spec import DEMO, RunSpec

_CACHE = {f.name: f for f in dataclasses.fields(RunSpec)}["attribution_cache_mb"]   # one definition, the run's


def register(subparsers) -> None:
    p = subparsers.add_parser("attribute", help="EAP-IG graph and smallest faithful circuit of a model (no unlearning)",
                              description="Attribute the forget behaviour of a causal LM on MCQ, QA or text records "
                                          "with EAP-IG, "
                                          "select the smallest circuit reaching the faithfulness target, and save "
                                          "both as a run folder the app opens (plus a circuit-tracer graph JSON).")
    p.add_argument("--demo", action="store_true", help="use the demo model and its forget set")
    p.add_argument("--model", help="local HF model folder or hub id")
    p.add_argument("--data", help="forget file (JSONL/CSV/Parquet) of MCQ, QA or text records (an optional "
                                  "'subject' field of MCQ records names the entity)")
    p.add_argument("--records", type=int, default=32, help="records attributed (the first N; default 32)")
    p.add_argument("--ig-steps", type=int, default=8, help="EAP-IG integration steps (default 8)")
    p.add_argument("--corruption", default="auto", choices=[*CORRUPTION_KINDS, *LEGACY_KINDS],
                   help="corrupted input: auto (default: subject when every record has one, else mean-ablation), "
                        "subject (swapped with another record's), shuffled-subject (a shuffled partner's subject, "
                        "question or text), mean-ablation, zero-ablation; counterfactual, mean, zero are the old "
                        "names of subject, mean-ablation, zero-ablation")
    p.add_argument("--metric", default=None, choices=["logit_diff", "logprob"],
                   help="metric of the correct answer (default logit_diff for MCQ, logprob for QA and text)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"prompt template of MCQ and QA records: {', '.join(PRESETS)}, wmdp:TOPIC or a custom string "
                        "containing {question} (default cloze-answer)")
    p.add_argument("--target", type=float, default=0.8, help="faithfulness the circuit must reach (default 0.8)")
    p.add_argument("--attribution-cache-mb", type=int, default=_CACHE.default,
                   help=f"{_CACHE.metadata['help']} (default {_CACHE.default})")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype (default auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="cpu, cuda or auto")
    p.add_argument("--tokenizer", default=None, metavar="fast|PATH",
                   help="'fast': the model's tokenizer.json exactly as saved (AutoTokenizer may rebuild a saved "
                        "word-level tokenizer as the architecture's BPE); PATH: a tokenizer folder or tokenizer.json "
                        "(default: AutoTokenizer on the model folder)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.set_defaults(func=run)


def _inputs(args: argparse.Namespace) -> tuple[str, str]:
    """--demo (or --model demo) is the demo model, with its forget split unless --data names other data."""
    if args.demo or args.model == DEMO:
        assets = ensure_demo()
        return str(assets.model_dir), args.data or str(assets.forget_path)
    if not (args.model and args.data):
        raise ValueError("give --demo, or both --model and --data")
    return args.model, args.data


def _check_ranges(args: argparse.Namespace) -> None:
    if args.records < 1:
        raise ValueError(f"--records must be a positive integer, got {args.records}")
    if args.ig_steps < 1:
        raise ValueError(f"--ig-steps must be a positive integer, got {args.ig_steps}")
    if not 0 < args.target <= 1.5:
        raise ValueError(f"--target must be in (0, 1.5], got {args.target}")
    if args.attribution_cache_mb < 0:
        raise ValueError(f"--attribution-cache-mb must be >= 0 (0 recomputes every batch), got "
                         f"{args.attribution_cache_mb}")


def run(args: argparse.Namespace) -> int:
    _check_ranges(args)
    model_path, data_path = _inputs(args)
    records = load_records(data_path)[: args.records]
    check_renders(records, check_template(args.template), source=data_path)
    resolve_kind(args.corruption, records)  # settings that cannot work fail before the model loads
    lm = load_model(model_path, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    prompts = prepare_prompts(lm.tokenizer, records, template=args.template, kind=args.corruption, metric=args.metric)
    graph = attribute(lm.model, lm.tokenizer, prompts.prompts, ig_steps=args.ig_steps, corruption=prompts.corruption,
                      metric=prompts.metric, per_example=True, max_records=None, progress=not args.json)
    circuit = smallest_faithful_circuit(lm.model, lm.tokenizer, prompts.prompts, graph, target=args.target,
                                        cache_mb=args.attribution_cache_mb)
    spec = {"model": model_path, "forget": data_path, "attribution_records": len(records), "ig_steps": args.ig_steps,
            "corruption": prompts.kind, "metric": prompts.metric, "template": args.template,
            "circuit_target": args.target}
    run_dir = _save(graph, circuit, lm.model, spec)
    summary = {"run_id": run_dir.name, "run_dir": str(run_dir), "records": len(records),
               "edges": int(graph.valid.sum()), "circuit_edges": len(circuit.edges), "circuit_nodes": circuit.nodes,
               "faithfulness": circuit.faithfulness, "reached": circuit.metadata.get("reached")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['edges']} edges attributed on {len(records)} records; smallest circuit reaching faithfulness "
              f"{args.target}: {len(circuit.edges)} edges, {len(circuit.nodes)} nodes, faithfulness "
              f"{circuit.faithfulness:.3f}\nrun {run_dir.name} (open it in the app's Circuit page): {run_dir}")
    return 0


def _save(graph, circuit, model, spec: dict) -> Path:
    """The run folder: graph (with its circuit-tracer export), circuit and masks; marked failed if a write fails."""
    run_dir = create_run({"kind": "attribution", "method": "attribution", "spec": spec},
                         f"attribution-{Path(spec['model']).name}")
    try:
        save_graph(graph, run_dir, "before", model=model, circuit=circuit)
        save_circuit(circuit, model, run_dir)
    except BaseException as exc:
        write_status(run_dir, "attribution", 0, 1, state="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    write_status(run_dir, "done", 1, 1, state="finished")
    return run_dir
