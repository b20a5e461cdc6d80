"""GPTQ worker: run by mansu.quant.gptq inside the side environment (llmcompressor 0.14.0.1, transformers 5.17),
never imported by mansu.  It imports nothing from mansu: mansu's own environment pins a newer transformers.

    python gptq_worker.py MODEL_DIR CALIBRATION_JSON OUT_DIR

MODEL_DIR: a save_pretrained folder; CALIBRATION_JSON: a list of token-id lists (tokenized by mansu, so that both
environments see the same tokens); OUT_DIR: the compressed-tensors (pack-quantized) checkpoint.  Prints one JSON
line: the GPTQ wall time in seconds.

The recipe (Frantar et al. 2023, GPTQ; llmcompressor's W4A16_ASYM preset): every Linear except lm_head, int4,
asymmetric, group 128, error-compensating rounding column by column, scales and zero points from the original
weights (so the grid is mansu's int4-g128 of the same weights; docs/quantizers.md).
"""

import json
import sys
import time
from pathlib import Path


def main(src: str, calibration: str, out: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    # llmcompressor requires a processor with a dataset, though it never tokenizes pre-tokenized data; the saved
    # tokenizer.json read as it is (no AutoTokenizer conversion, whose behaviour differs between the versions).
    tokenizer_file = Path(src) / "tokenizer.json"
    processor = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file)) if tokenizer_file.is_file() else None
    ids = json.loads(Path(calibration).read_text())
    ds = Dataset.from_list([{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    recipe = GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])
    oneshot(model=model, processor=processor, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=max(map(len, ids)))
    seconds = time.perf_counter() - t0
    model.save_pretrained(out, save_compressed=True)
    print(json.dumps({"gptq_seconds": seconds}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: gptq_worker.py MODEL_DIR CALIBRATION_JSON OUT_DIR")
    main(*sys.argv[1:])
