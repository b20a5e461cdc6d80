"""`python -m mansu gptq-env`: create (or check) the side environment in which `eval --quant gptq-int4-g128` and a
run's gptq-int4-g128 quantizer run llmcompressor's GPTQ (mansu.quant.gptq); both also create it on first use."""

from __future__ import annotations

import argparse

from mansu.quant.gptq import LLMCOMPRESSOR, ensure_env, env_pins


def register(subparsers) -> None:
    p = subparsers.add_parser("gptq-env", help="create the GPTQ side environment (llmcompressor)",
                              description=f"Create $MANSU_HOME/envs/gptq ({' + '.join(['torch', LLMCOMPRESSOR])}, "
                                          "the same torch build as mansu's; ~2 min and 1.5 GB, needs PyPI) if it is "
                                          "missing, and print its python.  llmcompressor pins an older transformers "
                                          "than mansu, so it cannot share mansu's environment.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    python = ensure_env()
    print(f"GPTQ environment ready: {python} ({', '.join(env_pins())})")
    return 0
