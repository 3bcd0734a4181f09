"""Tokenizer stand-ins for the benchmark tests (no download): characters for the tiny model, words for sizing."""

import re

import torch


class CharTokenizer:
    """One id per character; ids 0-2 are the tiny model's pad/eos/bos and never come from text."""

    chat_template = None
    eos_token_id = 1
    eos_token = "\x01"
    pad_token = None
    padding_side = "right"

    def encode(self, text, add_special_tokens=True):
        return [min(max(ord(c), 3), 250) for c in text]

    def __call__(self, text, return_tensors=None, add_special_tokens=True, padding=False, return_offsets_mapping=False):
        ids = self.encode(text)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(ids))]
        return out

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if 3 <= i <= 250)


class BatchCharTokenizer:
    """One id per character (3-250); takes a string or a list of them, as a Hugging Face tokenizer does."""

    eos_token_id = 1
    eos_token = "\x01"
    pad_token = None
    padding_side = "left"

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def _encode(self, text):
        return [min(max(ord(c), 3), 250) for c in text]

    def __call__(self, text, return_tensors=None, add_special_tokens=True, padding=False):
        rows = [self._encode(t) for t in ([text] if isinstance(text, str) else text)]
        width = max(len(r) for r in rows)
        ids = [[0] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if 3 <= i <= 250)


class WordTokenizer:
    """Words and punctuation marks (with the whitespace before them) are tokens, about as many as BPE gives."""

    chat_template = None
    _piece = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.pieces: list[str] = []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in self._piece.findall(text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.pieces)
                self.pieces.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)
