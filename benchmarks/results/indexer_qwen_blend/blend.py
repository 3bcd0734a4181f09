"""Weight-space blends of the long-dump candidate A with the zero-shot indexer it started from.

Candidate A (``../indexer_qwen_long_dump_h200/``) holds ``0.3 * zero-shot + 0.7 * trained`` weights. A blend at
``alpha`` holds ``(1 - alpha) * zero-shot + alpha * trained``, which is
``zero-shot + (alpha / 0.7) * (A - zero-shot)``; no training is repeated.

Usage: ``python blend.py CKPT_A INIT_INDEXER OUT_DIR 0.2,0.35,0.5`` (``INIT_INDEXER``: a Qwen dump's
``init_indexer`` folder, target layer 13). Writes ``OUT_DIR/alpha_<a>/``.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

A_INTERPOLATE = 0.7


def main() -> None:
    ck_a, init, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    alphas = [float(x) for x in sys.argv[4].split(",")]
    cfg_a, cfg_0 = json.loads((ck_a / "config.json").read_text()), json.loads((init / "config.json").read_text())
    same = {k: v for k, v in cfg_a["spec"].items() if k != "trained"} == {
        k: v for k, v in cfg_0["spec"].items() if k != "trained"
    }
    if not same:
        raise SystemExit("the two indexers differ in backbone, layers or shape: no blend")
    w_a, w_0 = load_file(ck_a / "model.safetensors"), load_file(init / "model.safetensors")
    if w_a.keys() != w_0.keys():
        raise SystemExit(f"different tensors: {sorted(set(w_a) ^ set(w_0))}")
    for alpha in alphas:
        t = alpha / A_INTERPOLATE
        blend = {k: (w_0[k].float() + t * (w_a[k].float() - w_0[k].float())).to(w_a[k].dtype) for k in w_a}
        d = out / f"alpha_{alpha:g}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in blend.items()}, d / "model.safetensors")
        cfg = dict(cfg_a)
        cfg["training"] = {**cfg_a.get("training", {}), "interpolated": {"interpolate": alpha, "from": str(ck_a)}}
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        print(d, {k: round(float((blend[k] - w_0[k].float()).norm()), 4) for k in list(blend)[:3]})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
