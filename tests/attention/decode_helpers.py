"""Step-by-step greedy decoding that keeps the logits, shared by the equivalence tests."""

import torch


@torch.no_grad()
def greedy_logits(model, ids, cache, steps, on_step=None, mask_for_step=None):
    """Prefill ``ids`` then decode ``steps`` tokens greedily; returns (tokens [B, steps], logits [B, steps+1, V])."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    tokens = []
    for step in range(steps):
        tok = out.logits[:, -1:].argmax(-1)
        tokens.append(tok)
        kwargs = {}
        if mask_for_step is not None:
            kwargs["attention_mask"] = mask_for_step(step)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, **kwargs)
        logits.append(out.logits[:, -1])
        if on_step is not None:
            on_step(step)
    return torch.cat(tokens, 1), torch.stack(logits, 1)
