"""Prompt adherence of a caption-conditioned model, measured on Twemoji.

    flowpre eval --weights model.safetensors --metric adherence --steps 1,4,32 --cfg 3 --num-samples 704

The question is whether an image drawn for a caption shows what the caption names. With
Twemoji every caption belongs to a Unicode subgroup (face-smiling, animal-mammal,
food-fruit, ...; flowpre/data/twemoji_subgroups.py), and a small classifier trained on the
real emoji images says which subgroup an image looks like (emoji_classifier.py). So:

    adherence = fraction of generated images whose predicted class is their caption's class

and `adherence_group` the same for the 9 groups (Smileys & Emotion, Animals & Nature, ...).
Three numbers make it readable, all on the same captions:

- ceiling: the classifier on the real images of those captions. A model cannot be judged
  better than the judge; on held-out emoji this is the classifier's honest accuracy.
- floor: the same generated images scored against shuffled captions (image for caption
  pi(i) against caption i's class), i.e. what a model that ignored its prompt but drew
  the same images would score. It is the exact mean over all shuffles,
  sum_k p_generated(k) p_caption(k), so it carries no shuffle noise. A model that draws
  only flags scores the share of flag captions here, not zero.
- chance: 1 / number of classes, and the share of the commonest class.

Each caption gets the same number of images (captions cycle: sample i has caption
i mod n), and sample i's noise depends only on (seed, i), so step counts and CFG scales
are compared on identical noise. Repeated images of a caption are not independent, so
the 95% interval is a bootstrap over captions (each resampled with all of its images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flowpre.eval.emoji_classifier import group_of, predict

BOOTSTRAP_ROUNDS = 1000


@dataclass
class CaptionSet:
    """Captions to draw, each with its class (id into class_names) and its real image."""

    name: str
    captions: list[str]
    class_ids: torch.Tensor  # (n,) long
    images: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    class_names: list[str]
    kinds: list[str | None]  # per caption: None, or for held-out ones "emoji" / "recombination"

    def subset(self, keep, name=None):
        keep = list(keep)
        return CaptionSet(name or self.name, [self.captions[i] for i in keep], self.class_ids[keep],
                          self.images[keep], self.class_names, [self.kinds[i] for i in keep])


def load_caption_set(spec, image_size, limit=None):
    """A caption set from a captioned, class-labelled source split (`twemoji-subgroups:heldout`),
    its images at `image_size` (the model's), quantized as every real image is."""
    from flowpre.eval.classifier import load_split

    images, labels, info, metas = load_split(spec, image_size=image_size, limit=limit, with_meta=True)
    if not info.get("has_captions"):
        raise ValueError(f"{spec!r} has no captions")
    return CaptionSet(spec, [m["caption"] for m in metas], labels, images, list(info["class_names"]),
                      [m.get("heldout") for m in metas])


def spread(captions, count):
    """`count` of the caption set, evenly spread over its (file) order, for grids and small runs."""
    n = len(captions.captions)
    if count >= n:
        return captions
    return captions.subset(sorted({i * n // count for i in range(count)}))


def shuffled_floor(pred, target, num_classes):
    """Mean match rate of `pred` against a uniformly shuffled `target`: sum_k p_pred(k) p_target(k)."""
    p = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    q = torch.bincount(target, minlength=num_classes).double() / len(target)
    return float((p * q).sum())


def bootstrap_interval(per_caption, rounds=BOOTSTRAP_ROUNDS, seed=0):
    """95% interval of the mean of per-caption match rates, captions resampled with replacement."""
    if len(per_caption) < 2:
        return [float("nan"), float("nan")]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(per_caption), (rounds, len(per_caption)), generator=g)
    means = per_caption.double()[idx].mean(1)
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def score(pred, target, caption_index, class_names):
    """Adherence of predictions `pred` (N,) for images whose captions have classes `target` (N,);
    caption_index (N,) says which caption each image was drawn for (for the bootstrap)."""
    groups = sorted({group_of(c) for c in class_names})
    group_id = torch.tensor([groups.index(group_of(c)) for c in class_names])
    hit, hit_group = pred == target, group_id[pred] == group_id[target]
    _, per_caption_index = torch.unique(caption_index, return_inverse=True)
    n_captions = int(per_caption_index.max()) + 1 if len(pred) else 0
    per_caption = torch.zeros(n_captions).index_add_(0, per_caption_index, hit.float())
    per_caption /= torch.bincount(per_caption_index, minlength=n_captions).float()
    by_group = {}
    for g, name in enumerate(groups):
        mine = group_id[target] == g
        if mine.any():
            by_group[name] = {"adherence": float(hit[mine].float().mean()), "images": int(mine.sum())}
    counts = torch.bincount(target, minlength=len(class_names))
    return {"adherence": float(hit.float().mean()), "adherence_group": float(hit_group.float().mean()),
            "ci95": bootstrap_interval(per_caption),
            "floor": shuffled_floor(pred, target, len(class_names)),
            "floor_group": shuffled_floor(group_id[pred], group_id[target], len(groups)),
            "chance": 1 / len(class_names), "commonest_class": class_names[int(counts.argmax())],
            "commonest_class_share": float(counts.max()) / max(len(target), 1),
            "images": len(pred), "captions": n_captions, "by_group": by_group,
            "per_caption": [round(float(v), 4) for v in per_caption]}  # in caption order


def ceiling(classifier, captions):
    """The classifier on the captions' real images, scored like generated ones."""
    from flowpre.eval.generate import quantize

    index = torch.arange(len(captions.captions))
    return score(predict(classifier, quantize(captions.images)), captions.class_ids, index, captions.class_names)


def check_classifier(meta, captions, source):
    """The classifier must know exactly the caption set's classes."""
    if meta["class_names"] != captions.class_names:
        raise ValueError(f"{source}: the classifier was trained on other classes ({len(meta['class_names'])}) than "
                         f"{captions.name!r} has ({len(captions.class_names)}); retrain it with "
                         f"python -m flowpre.eval.train_emoji_classifier")


class CaptionEncoder:
    """Caption indices -> the text encoder's conditions, each caption encoded once."""

    def __init__(self, text, captions, batch_size=64):
        self.null = text.null
        self.table = torch.cat([text(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)])

    def __call__(self, index):
        return self.table.to(index.device)[index]


def draw(model, encoder, num_captions, num_samples, steps, cfg, seed, shift=1.0, batch_size=256, device="cpu"):
    """Generate num_samples images (captions cycling) -> (images in [-1, 1] on the CPU, caption index)."""
    from flowpre.eval.generate import generate

    images, index = [], []
    for x, cond, _ in generate(model, num_samples, steps, seed, shift, cfg, batch_size, device,
                               num_conditions=num_captions, encode=encoder, null=encoder.null):
        images.append(x.cpu())
        index.append(cond.cpu())
    return torch.cat(images), torch.cat(index)


class AdherenceMetric:
    """`flowpre eval --metric adherence`: the metric interface of evaluate.py (start, update, finish)."""

    columns = ("adherence", "adherence_group", "floor", "floor_group")

    def __init__(self, classifier_path, captions, device):
        from flowpre.eval.emoji_classifier import WEIGHTS, load_emoji_classifier

        path = classifier_path or WEIGHTS
        self.net, meta = load_emoji_classifier(path, device)
        check_classifier(meta, captions, "--classifier")
        self.captions = captions
        top = ceiling(self.net, captions)
        self.info = {"classifier": str(path), "classifier_heldout_accuracy": float(meta["heldout_accuracy"]),
                     "classifier_train_files_sha256": meta.get("train_files_sha256"), "captions": len(captions.captions),
                     "ceiling": top["adherence"], "ceiling_group": top["adherence_group"],
                     "chance": top["chance"], "commonest_class_share": top["commonest_class_share"]}
        self.note = (f"{len(captions.captions)} captions of {captions.name}; ceiling (their real images through the "
                     f"classifier) {top['adherence']:.4f}, group {top['adherence_group']:.4f}; chance "
                     f"{top['chance']:.4f} (1/{len(captions.class_names)} classes); floor: the same images scored "
                     f"against shuffled captions")

    def start(self):
        self.pred, self.index = [], []

    def update(self, x, caption_index):
        self.pred.append(predict(self.net, x))
        self.index.append(caption_index.cpu())

    def finish(self):
        index = torch.cat(self.index)
        out = score(torch.cat(self.pred), self.captions.class_ids[index], index, self.captions.class_names)
        return {k: out[k] for k in ("adherence", "adherence_group", "floor", "floor_group", "ci95", "images")}
