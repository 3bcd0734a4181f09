"""A tokenizer stand-in for tiny random models: one id per character (no download)."""

import torch


class CharTokenizer:
    chat_template = None
    eos_token_id = 255
    pad_token = None

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [min(ord(c), 250) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


class Prompt:
    def __init__(self, text, split, kind="synthetic"):
        self.text, self.split, self.kind, self.doc_ids = text, split, kind, (f"doc-{hash(text) % 1000}",)
