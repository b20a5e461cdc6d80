"""Benchmark: MANSU's candidate selection (`Mansu.choose`), the chunked score (a ChunkedScore through the radix
selection: no [n] score or touched mask) against the former whole-score path (an [n] fp32 score and an [n] bool
mask, then the same selection), each in its own process at n and 2n circuit coordinates (both past TOPK_DIRECT,
so both take the radix selection): peak RSS above the inputs (p, Fisher, total: 12 B per coordinate), median of 3
calls' seconds, and the candidates' hash.  The figure that matters at 8B is the slope, the extra bytes per
additional coordinate; the selection's chunk buffers (~200 MB) are a constant.

    .venv/bin/python bench/choose_bench.py [--n 40000000]

Prints one JSON line per path and size, then the headline (bench/README.md's fields): the chunked path's bytes
per additional coordinate against the whole-score path's (~5: the score 4 + the mask 1), target ratio < 0.25 with
the same candidates; time_ratio is the chunked path's seconds over the whole one's at 2n.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def selector(n: int, seed: int = 0):
    """A Mansu object holding just what `choose` reads: p, Fisher, total (10% touched), fisher_ratio selection."""
    import torch

    from mansu.unlearn.config import UnlearnConfig
    from mansu.unlearn.methods.mansu import Mansu

    gen = torch.Generator().manual_seed(seed)
    m = Mansu.__new__(Mansu)
    m.config = UnlearnConfig(method="mansu", selection="fisher_ratio")
    m.n, m.n_candidates = n, max(1, int(m.config.update_fraction * n))
    m.fisher = torch.rand(n, generator=gen)
    m.total = torch.zeros(n)
    m.total[torch.randint(0, n, (n // 10,), generator=gen)] = 1.0
    return m, torch.randn(n, generator=gen)


def whole_score_choose(m, p):
    """The former `choose`: an [n] score and an [n] touched mask held whole, then the same selection."""
    import torch

    from mansu.unlearn.methods.base import top_indices

    touched = m.total != 0
    score = m.score(p, m.fisher, m.damping()).masked_fill_(touched, 0)
    cand = top_indices(score, min(m.n_candidates, int(torch.count_nonzero(score))))
    return cand, -m.config.lr * p[cand], score[cand], int(torch.count_nonzero(touched))


def child(path: str, n: int) -> None:
    m, p = selector(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = m.choose if path == "chunked" else (lambda g: whole_score_choose(m, g))
    times, out = [], None
    for _ in range(3):
        t = time.perf_counter()
        out = run(p)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"path": path, "n": n, "extra_bytes_per_coordinate": round((peak - base) / n, 2),
                      "median_s": round(sorted(times)[1], 3),
                      "candidates_sha1": hashlib.sha1(out[0].numpy().tobytes()).hexdigest()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40_000_000, help="circuit coordinates of the smaller size (default 4e7)")
    ap.add_argument("--child", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.n)
    got = {}
    for path in ("whole", "chunked"):
        for n in (args.n, 2 * args.n):
            out = subprocess.run([sys.executable, __file__, "--child", path, "--n", str(n)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            got[path, n] = json.loads(out)
            print(json.dumps(got[path, n]))
    slope = {path: round((got[path, 2 * args.n]["extra_bytes_per_coordinate"] * 2 * args.n
                          - got[path, args.n]["extra_bytes_per_coordinate"] * args.n) / args.n, 2)
             for path in ("whole", "chunked")}
    same = all(got["whole", n]["candidates_sha1"] == got["chunked", n]["candidates_sha1"] for n in (args.n, 2 * args.n))
    time_ratio = got["chunked", 2 * args.n]["median_s"] / got["whole", 2 * args.n]["median_s"]
    ratio = slope["chunked"] / slope["whole"]
    print(json.dumps({"bench": "mansu_choose", "metric": "bytes_per_additional_coordinate", "value": slope["chunked"],
                      "unit": "B", "reference": "the whole-score path", "reference_value": slope["whole"],
                      "ratio": round(ratio, 3), "target": "ratio < 0.25, the same candidates",
                      "meets_target": ratio < 0.25 and same, "time_ratio": round(time_ratio, 3)}))


if __name__ == "__main__":
    main()
