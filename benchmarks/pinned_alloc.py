"""Cost and bytes of page-locking a KV mirror, several ways, each variant in a process of its own.

The mirror of a 128K-token prompt of a Llama-3-8B shape is 64 tensors (K and V of 32 layers) of just over
256 MiB each (260 MiB here: room for the answer). Variants:

- ``torch_pinned``: ``torch.empty(pin_memory=True)`` per tensor, torch's caching host allocator (rounds each block
  up to a power of two); then the same again after freeing them (the allocator's cache);
- ``register_one`` / ``register_each``: ordinary memory, registered with ``cudaHostRegister`` as one block or per
  tensor, pages untouched before;
- ``register_touched``: one block written once (``zero_``, which faults its pages in on every core), then registered;
- ``alloc_conf_register``: torch's allocator with ``pinned_use_cuda_host_register`` and 8 register threads;
- ``torch_pinned_exact``: torch's allocator with tensors of exactly 256 MiB (nothing to round).

Recorded per variant: seconds, ``MemFree`` before and after (MiB), torch's host allocator bytes, and the
host-to-device and device-to-host bandwidth of a 256 MiB piece (GB/s).

    python benchmarks/pinned_alloc.py   # writes pin_probe.json into $OUT (default: the current folder)
"""

import json
import os
import subprocess
import sys
import time

import torch

MiB = 1 << 20
N = 64
PER = 256 * MiB + 4 * MiB  # one layer's K or V mirror of a 128K prompt plus answer room


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            if k in ("MemFree", "MemAvailable", "Mlocked", "Unevictable"):
                out[k] = int(v.split()[0]) // 1024
    return out


def bw(host):
    dev = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    for _ in range(2):
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        h2d = time.perf_counter() - t
        t = time.perf_counter()
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        d2h = time.perf_counter() - t
    return host.numel() / h2d / 1e9, host.numel() / d2h / 1e9


def variant(name):
    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    before = meminfo()
    res = {"variant": name}
    if name == "torch_pinned":
        t = time.perf_counter()
        xs = [torch.empty(PER, dtype=torch.uint8, pin_memory=True) for _ in range(N)]
        res["alloc_s"] = time.perf_counter() - t
        res["stats"] = {
            k: v
            for k, v in torch.cuda.host_memory_stats().items()
            if "reserved" in k or "allocated_bytes.current" in k or "num_host_alloc" in k
        }
        res["mem_after"] = meminfo()
        del xs
        t = time.perf_counter()
        xs = [torch.empty(PER, dtype=torch.uint8, pin_memory=True) for _ in range(N)]
        res["again_s"] = time.perf_counter() - t
        res["bw_gbs"] = bw(xs[0][: 256 * MiB])
    elif name in ("register_one", "register_each", "register_touched"):
        cud = torch.cuda.cudart()
        t = time.perf_counter()
        if name == "register_each":
            xs = [torch.empty(PER, dtype=torch.uint8) for _ in range(N)]
            for x in xs:
                assert int(cud.cudaHostRegister(x.data_ptr(), x.numel(), 0)) == 0
        else:
            x = torch.empty(N * PER, dtype=torch.uint8)
            if name == "register_touched":
                x.zero_()
                res["touch_s"] = time.perf_counter() - t
            assert int(cud.cudaHostRegister(x.data_ptr(), x.numel(), 0)) == 0
            xs = [x[i * PER : (i + 1) * PER] for i in range(N)]
        res["alloc_s"] = time.perf_counter() - t
        res["is_pinned"] = bool(xs[0].is_pinned())
        res["mem_after"] = meminfo()
        res["bw_gbs"] = bw(xs[0][: 256 * MiB])
        t = time.perf_counter()
        if name == "register_each":
            for x in xs:
                cud.cudaHostUnregister(x.data_ptr())
        else:
            cud.cudaHostUnregister(x.data_ptr())
        res["unregister_s"] = time.perf_counter() - t
    elif name == "alloc_conf_register":
        t = time.perf_counter()
        xs = [torch.empty(PER, dtype=torch.uint8, pin_memory=True) for _ in range(N)]
        res["alloc_s"] = time.perf_counter() - t
        res["stats"] = {
            k: v for k, v in torch.cuda.host_memory_stats().items() if "reserved" in k or "allocated_bytes.current" in k
        }
        res["mem_after"] = meminfo()
        res["bw_gbs"] = bw(xs[0][: 256 * MiB])
    elif name == "torch_pinned_exact":
        t = time.perf_counter()
        xs = [torch.empty(256 * MiB, dtype=torch.uint8, pin_memory=True) for _ in range(N)]
        res["alloc_s"] = time.perf_counter() - t
        res["mem_after"] = meminfo()
    res["mem_before"] = before
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        variant(sys.argv[1])
        sys.exit()
    out = os.environ.get("OUT", ".")
    rows = []
    for name in (
        "torch_pinned",
        "register_one",
        "register_each",
        "register_touched",
        "alloc_conf_register",
        "torch_pinned_exact",
    ):
        env = dict(os.environ)
        if name == "alloc_conf_register":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
        p = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True)
        print(name, p.stdout.strip()[-2000:], p.stderr.strip()[-1500:], flush=True)
        if p.returncode == 0:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    json.dump(rows, open(os.path.join(out, "pin_probe.json"), "w"), indent=1)
