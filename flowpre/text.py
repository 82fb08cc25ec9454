"""Frozen text encoder for caption-conditioned DiTs (`model.text_encoder: PATH`).

A local transformers checkpoint, never downloaded: a CLIP text model (`clip_text_model`,
or a full `clip` checkpoint whose text half is used) or a T5 encoder (`t5`, `umt5`,
`mt5`). Captions become one tensor per sample,

    cond = [pooled; token_1; ...; token_L]          (B, 1 + L, text_dim)

so that everything downstream (label dropout, CFG batching, index_copy in the
objectives, checkpoints of nothing: the encoder is frozen) handles a text condition
exactly like a class id: a tensor whose first dimension is the batch. The null
condition for CFG is the encoding of the empty caption, as in Stable Diffusion.

pooled: CLIP's pooler output (the end-of-text token's state); for T5 the mean of the
token states under the attention mask (T5 has no pooled output). Tokens are padded to
`max_length` and all L states are attended to (no mask), as Stable Diffusion does.

Tokenizer: the one saved beside the model if there is one; for a CLIP model without
tokenizer files, the real CLIP BPE vocabulary from the open-clip-torch wheel
(bpe_simple_vocab_16e6.txt.gz, located without importing open_clip, which needs
torchvision). transformers 5 takes vocab/merges as objects, not file names.

The encoder runs once per batch in the training loop (not inside the DiT), so the EMA
and teacher forwards of the objectives reuse its output; it stays in fp32 and outside
DeepSpeed (frozen weights need no optimizer state, and each rank keeps a copy).
"""
from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

from flowpre.config import ConfigError

CLIP_TYPES = ("clip_text_model", "clip")
T5_TYPES = ("t5", "mt5", "umt5")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


class TextEncoderError(ConfigError):
    """A text encoder that cannot be used (the CLI prints it as an error, exit code 2)."""


def _clip_byte_alphabet():
    """CLIP's byte-level alphabet, in vocabulary order: the 188 printable bytes as
    themselves, then the other 68 bytes mapped to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocabulary():
    """(vocab dict, merges list) of the 49408-token CLIP BPE, built from open-clip-torch's file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError("the CLIP tokenizer needs the vocabulary in the open-clip-torch wheel: "
                               "pip install --no-deps open-clip-torch (or save a tokenizer beside the model)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # line 0 is a version header; CLIP uses the first 49152 - 256 - 2 merges
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = _clip_byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def load_tokenizer(path, model_type):
    from transformers import AutoTokenizer, CLIPTokenizer

    if any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if model_type in CLIP_TYPES:
        vocab, merges = clip_vocabulary()
        return CLIPTokenizer(vocab=vocab, merges=merges)
    raise TextEncoderError(f"model.text_encoder: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                           f"only CLIP models can fall back to the open-clip vocabulary")


class TextEncoder:
    """captions (list of str) -> (B, 1 + max_length, dim) float32 on `device`, without grad."""

    def __init__(self, path, max_length=77, device="cpu"):
        from transformers import AutoConfig, CLIPTextModel, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per weight load clutters the training log
        path = Path(path)
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"model.text_encoder: {path} is not a local transformers checkpoint "
                                   f"(no config.json); flowpre never downloads models")
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        self.kind = config.model_type
        if self.kind in CLIP_TYPES:
            net = CLIPTextModel.from_pretrained(str(path), local_files_only=True)
        elif self.kind in T5_TYPES:
            net = T5EncoderModel.from_pretrained(str(path), local_files_only=True)
        else:
            raise TextEncoderError(f"model.text_encoder: {path} is a {self.kind!r} model; "
                                   f"use a CLIP text model or a T5 encoder")
        limit = getattr(net.config, "max_position_embeddings", None)  # CLIP's learned positions
        if limit and max_length > limit:
            raise TextEncoderError(f"model.text_max_length {max_length} exceeds the encoder's {limit} positions")
        self.path, self.max_length, self.device = str(path), max_length, torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(path, self.kind)
        self.dim = net.config.hidden_size
        self.tokens = 1 + max_length  # pooled + token states
        self.null = self([""])[0]  # (1 + L, dim): the CFG null condition

    @torch.no_grad()
    def __call__(self, captions):
        if isinstance(captions, str):
            raise TypeError("TextEncoder takes a list of captions, not one string")
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt").to(self.device)
        with torch.autocast(self.device.type, enabled=False):  # fp32 whatever the training precision
            out = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            states = out.last_hidden_state.float()  # (B, L, dim)
            if self.kind in CLIP_TYPES:
                pooled = out.pooler_output.float()
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.cat([pooled[:, None], states], dim=1)  # (B, 1 + L, dim)

    def describe(self):
        """What an export records, so a sampler can rebuild the encoder."""
        return {"path": self.path, "max_length": self.max_length, "kind": self.kind, "dim": self.dim}
