"""The optimizer step on the host, as ZeRO-Offload runs it (``train.offload_optimizer: cpu``):
torch's AdamW in its default implementation, torch's fused CPU kernel (what the loop uses when
offloading), and, with ``--deepspeed``, DeepSpeed's compiled CPU Adam (its C++ op is built on
first use, about 40 s on 2 cores), on one flat fp32 partition as DeepSpeed hands it over.

    python bench/adamw_bench.py [--params 50000000] [--threads 1,2] [--steps 5] [--deepspeed]

Prints ns per parameter per step and each against the default, measured side by side.
"""

from __future__ import annotations

import argparse
import time

import torch


def _opt(name: str, p: torch.nn.Parameter):
    if name == "torch (default)":
        return torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01)
    if name == "torch fused":
        return torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=True)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.01, adamw_mode=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=50_000_000)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--deepspeed", action="store_true")
    a = ap.parse_args()
    names = ["torch (default)", "torch fused"] + (["DeepSpeedCPUAdam"] if a.deepspeed else [])
    for threads in map(int, a.threads.split(",")):
        torch.set_num_threads(threads)
        base = None
        for name in names:
            p = torch.nn.Parameter(torch.randn(a.params))
            p.grad = torch.randn(a.params)
            opt = _opt(name, p)
            opt.step()  # first step: state allocated
            t0 = time.perf_counter()
            for _ in range(a.steps):
                opt.step()
            ns = (time.perf_counter() - t0) / a.steps / a.params * 1e9
            base = base or ns
            print(f"{threads} thread(s)  {name:16s} {ns:6.2f} ns/param/step  "
                  f"{base / ns:5.1f}x the default", flush=True)
            del opt, p


if __name__ == "__main__":
    main()
