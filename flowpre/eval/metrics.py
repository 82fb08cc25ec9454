"""Sample-quality metrics on feature vectors: Frechet distance, k-NN precision/recall,
class accuracy.

Features come from any network (the project's Fashion-MNIST classifier for FD,
InceptionV3 for FID); these functions only see (N, D) arrays. Statistics are kept in
float64: a 2048-d covariance summed over 10^4 samples in float32 loses digits the
matrix square root then amplifies.
"""
from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features):
    """(mean (D,), covariance (D, D)) in float64; the covariance is unbiased (N - 1), as in
    every FID implementation, so numbers stay comparable."""
    f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s):
    """Symmetric square root of a covariance; eigenvalues below 0 are rounding and are cut."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1, s2, method="eigh", root1=None):
    """tr((s1 s2)^(1/2)) for covariances s1, s2.

    "eigh" (default): s1 s2 is similar to the symmetric PSD matrix r s2 r with r = s1^(1/2),
    so the trace is the sum of square roots of the latter's (real, >= 0) eigenvalues: two
    symmetric eigendecompositions, no complex arithmetic, and stable when the covariances
    are singular (fewer samples than dimensions), where a general sqrtm can return
    garbage; `root1` may pass a precomputed s1^(1/2) (see FrechetReference).
    "sqrtm": scipy's general square root of s1 s2, as pytorch-fid and
    fid-helper-pytorch do, with their fallbacks (an eps offset when the result is not finite;
    imaginary parts that are rounding are dropped, large ones are an error).
    """
    if method == "eigh":
        r = _sqrt_psd(s1) if root1 is None else root1
        m = r @ s2 @ r
        ev = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrize away rounding before eigvalsh
        return float(np.sqrt(np.clip(ev, 0, None)).sum())
    if method == "sqrtm":
        import scipy.linalg

        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
            covmean = covmean.real
        return float(np.trace(covmean))
    raise ValueError(f"unknown method {method!r}: eigh or sqrtm")


def frechet_distance(mu1, s1, mu2, s2, method="eigh", root1=None):
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)): the squared 2-Wasserstein distance
    between Gaussians with these moments (FID when the features are Inception's)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2, method, root1)
    # Mathematically >= 0; a set against itself can land a rounding error below zero.
    return max(float(fd), 0.0)


def frechet_distance_features(f1, f2, method="eigh"):
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2), method=method)


class FrechetReference:
    """Fixed reference moments whose covariance square root is computed once: an evaluation
    compares many sample sets (one per step count) with the same real statistics, and at
    2048-d the root is the expensive half of the eigh method."""

    def __init__(self, mu, sigma):
        self.mu, self.sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        self.root = _sqrt_psd(self.sigma)

    def distance(self, mu, sigma):
        return frechet_distance(self.mu, self.sigma, mu, sigma, root1=self.root)


# ----------------------------------------------------------------------------- precision / recall

def _as_tensor(f):
    return (f if isinstance(f, torch.Tensor) else torch.from_numpy(np.asarray(f))).detach().cpu().double()


def knn_radii(features, k=3, chunk=1024):
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = _as_tensor(features)
    if len(f) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(f)}")
    # kthvalue(k + 1): the smallest distance is the point to itself (0).
    return torch.cat([torch.cdist(f[i:i + chunk], f).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(f), chunk)])


def manifold_coverage(support, radii, query, chunk=1024):
    """Fraction of `query` points inside the union of balls (support_i, radii_i)."""
    s, q = _as_tensor(support), _as_tensor(query)
    inside = [(torch.cdist(q[i:i + chunk], s) <= radii[None]).any(dim=1) for i in range(0, len(q), chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019).

    Each set's manifold is the union of balls reaching each point's k-th nearest
    neighbour. Precision: share of generated points inside the real manifold (are
    samples realistic?). Recall: share of real points inside the generated manifold
    (is the data's variety covered?). Both depend on the set sizes; compare runs at
    equal sizes (the paper uses equal real and generated counts). Precision is
    generous where the real set has outliers, whose balls are wide: in the 128-d
    classifier space, 500 pure-noise images score 0.97 precision (0.73 at 2,000) but
    0 recall, so read it beside FD and recall, never alone.
    """
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall


# ----------------------------------------------------------------------------- classes

def class_accuracy(logits, requested):
    """Share of samples the classifier assigns to the class they were generated for."""
    logits, requested = torch.as_tensor(logits), torch.as_tensor(requested)
    if len(logits) != len(requested):
        raise ValueError(f"{len(logits)} predictions for {len(requested)} requested classes")
    return (logits.argmax(dim=1).cpu() == requested.cpu()).double().mean().item()


def per_class_accuracy(logits, requested, num_classes):
    """(num_classes,) accuracy per requested class (nan for a class never requested)."""
    pred = torch.as_tensor(logits).argmax(dim=1).cpu()
    requested = torch.as_tensor(requested).cpu()
    out = []
    for c in range(num_classes):
        mask = requested == c
        out.append((pred[mask] == c).double().mean().item() if mask.any() else float("nan"))
    return out
