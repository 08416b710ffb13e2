"""Learnable class-level sampling distribution for BALMS stage-2 classifier retraining.

The meta-sampler of Balanced Meta-Softmax (Ren et al., NeurIPS 2020) draws an image of
class c with probability proportional to a learned weight w_c = sigmoid(theta_c), so class
c receives a share n_c * w_c / sum_k n_k * w_k of every batch. Two relaxations give the
straight-through gradient to theta, with draws of that same distribution:

- ``image`` (BALMS's own): a hard Gumbel-softmax over all N images with logits log w_{y_i}; the
  drawn image's weight carries the gradient of its soft entry. BALMS materialises the (B, N) soft
  matrix for autograd; here the noise is drawn in row chunks and reduced to the drawn image and each
  class's sum of exp(z - max z), z = (logit + noise) / tau (B, C), from which that entry is an exact
  function of theta alone (``sample_images``): BALMS's gradient, O(B * C) for autograd.
- ``class``: "draw a class" (a (B, C) Gumbel-softmax, logits log n_c + log w_c) then "draw a uniform
  image of it" (``sample_classes``, ``draw_images``): O(B * C) noise, and the gradient of the soft
  class entry. Not BALMS's: its self term is scaled by the class's soft mass where BALMS's is scaled
  by the image's, and on small problems the two mean meta-gradients differ in sign for tail classes
  (bench/meta_gradient.py).

The per-sample weight returned with each drawn class has value exactly 1 and carries the
straight-through gradient to theta; the caller multiplies per-sample losses by it inside
the differentiable inner step (see ``meta_sampler.meta_step``). Nothing here keeps those
weights: they travel as return values.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.transfer import to_device, widest_float

logger = logging.getLogger(__name__)

RELAXATIONS = ("image", "class")  # the Gumbel-softmax the meta-gradient comes from (ClassSampler.draw)
# Units of the image relaxation's per-class sums T: a term below 2^-40 of its row's largest (which is 1, and
# T's sum >= 1) drops, and N x 2^40 stays below int64's 2^63 for N up to 8 million images.
FIXED_POINT = 2.0**40


def _validate_labels(labels: Tensor, num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be a 1-D int64 tensor of class indices, got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}; pass labels.long().view(-1)."
        )
    if labels.numel() == 0:
        raise ValueError("labels is empty: the sampler needs at least one labelled image.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] but range over [{low}, {high}]; "
            f"check num_classes or remap the labels."
        )


def init_class_weights(class_counts: Sequence[int], init_pow: float) -> Tensor:
    """BALMS's initial per-class weights w = (1/pi^p) / (min + max), values in (0, 1).

    pi = n / sum(n) are the class frequencies and min/max are taken over 1/pi^p of the
    non-empty classes. p = 0 gives w = 1/2 everywhere (instance-balanced sampling); p = 1
    gives n_c * w_c constant (class-balanced sampling). Empty classes are never drawn, so
    their weight is irrelevant; they get 1/2 to keep theta = logit(w) finite.
    Returns a float32 tensor of shape (C,).
    """
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty sequence of per-class image counts.")
    if bool((counts < 0).any()) or not bool((counts > 0).any()):
        raise ValueError(
            f"class_counts must be >= 0 with at least one positive entry, got {counts.tolist()}."
        )
    if not math.isfinite(init_pow):
        raise ValueError(f"init_pow must be a finite float, got {init_pow}.")
    present = counts > 0
    freq = counts[present] / counts.sum()
    inv = freq.pow(-init_pow)
    weights = torch.full_like(counts, 0.5)
    weights[present] = inv / (inv.min() + inv.max())
    return weights.float()


def image_noise(shape: tuple[int, int], generator: torch.Generator, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """Uniforms (B, N) for the image relaxation, from the run's generator. On a CUDA device they are made there
    by a generator seeded from the run's (B x N values a step, which a GPU would otherwise wait for the CPU to
    draw): a CUDA run's draws are its own, repeatable on the same GPU model (CUDA's generator's stream depends
    on the launch grid); on other devices they are drawn on the CPU, the same everywhere."""
    if device.type == "cuda":
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return torch.rand(shape, generator=torch.Generator(device).manual_seed(seed), dtype=dtype, device=device)
    return to_device(torch.rand(shape, generator=generator, dtype=dtype), device)


def _check_draw(batch_size: int, tau: float) -> None:
    """The arguments of a batch's draw under either relaxation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not tau > 0:
        raise ValueError(f"tau must be a positive temperature, got {tau}.")


def balanced_batch(
    labels: Tensor, num_classes: int, batch_size: int, generator: torch.Generator
) -> Tensor:
    """Indices (batch_size,) of a class-balanced batch: uniform non-empty class, then uniform image.

    Implemented as one multinomial draw over the N images with weight 1 / n_{y_i}, which
    gives every non-empty class total mass 1 and is uniform within a class; O(N) per call.
    """
    _validate_labels(labels, num_classes)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    counts = torch.bincount(labels, minlength=num_classes).double()
    image_weights = counts[labels].reciprocal()
    return torch.multinomial(image_weights, batch_size, replacement=True, generator=generator)


class ClassSampler(nn.Module):
    """Learned sampling distribution p(c) = n_c w_c / sum_k n_k w_k with w_c = sigmoid(theta_c).

    Built from the training labels (N,) so that it knows the class counts n (C,) and can map
    drawn classes to image indices. The only parameter is ``theta`` (C,); ``counts`` and
    ``log_counts`` are persistent buffers; the class-sorted image index used by
    ``draw_images`` is a non-persistent buffer rebuilt from the labels at construction.
    """

    def __init__(self, labels: Tensor, num_classes: int, init_pow: float = 0.0) -> None:
        super().__init__()
        _validate_labels(labels, num_classes)
        counts = torch.bincount(labels, minlength=num_classes)
        weights = init_class_weights(counts.tolist(), init_pow)
        self.theta = nn.Parameter(torch.logit(weights))
        # Float counts so class_probs is exactly n_c w_c / sum (exp(log n) would round).
        self.register_buffer("counts", counts.float())
        # log 0 = -inf: an empty class gets zero probability and is never drawn.
        self.register_buffer("log_counts", counts.float().log())
        # Image indices grouped by class; class c occupies [offsets[c], offsets[c] + n_c).
        self.register_buffer("sorted_indices", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("offsets", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("labels", labels.clone(), persistent=False)  # (N,) for the image relaxation
        empty = int((counts == 0).sum())
        if empty:
            logger.warning("%d of %d classes have no images and will never be sampled.", empty, num_classes)

    @property
    def num_classes(self) -> int:
        return self.theta.numel()

    def class_probs(self) -> Tensor:
        """Detached (C,) share of each class in a batch: n_c w_c / sum_k n_k w_k."""
        with torch.no_grad():
            mass = self.counts * torch.sigmoid(self.theta)
            return mass / mass.sum()

    def sample_classes(
        self, batch_size: int, generator: torch.Generator, tau: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Draw batch_size classes by hard straight-through Gumbel-softmax over C classes.

        Logits are log n_c + log sigmoid(theta_c), so the draw follows ``class_probs``.
        Returns (classes (B,) int64, weights (B,) float). Each weight equals the
        straight-through one-hot's entry at the drawn class: its value is exactly 1
        (written as 1 + (s - s.detach()) with s the soft entry, rather than
        1 - s.detach() + s which rounds) and its gradient is ds/dtheta. tau is the softmax
        temperature of the soft relaxation; it changes only the gradient.
        """
        _check_draw(batch_size, tau)
        logits = self.log_counts + F.logsigmoid(self.theta)  # (C,)
        # Drawn on the CPU from the run's generator, whatever the device: the same draws everywhere,
        # and on a GPU one copy the host does not wait for.
        uniform = to_device(torch.rand((batch_size, self.num_classes), generator=generator, dtype=logits.dtype),
                            logits.device)
        # Clamp keeps Gumbel noise finite when rand returns exactly 0.
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(logits.dtype).tiny)))
        perturbed = logits + gumbel  # (B, C); empty classes stay at -inf
        classes = perturbed.detach().argmax(dim=1)  # (B,)
        soft = torch.softmax(perturbed / tau, dim=1)  # (B, C)
        picked = soft.gather(1, classes.unsqueeze(1)).squeeze(1)  # (B,)
        weights = 1.0 + (picked - picked.detach())
        return classes, weights

    def draw_images(self, classes: Tensor, generator: torch.Generator) -> Tensor:
        """Indices (B,) into the training set of a uniformly drawn image of each class in classes (B,)."""
        if classes.dim() != 1 or classes.dtype != torch.int64:
            raise ValueError(
                f"classes must be a 1-D int64 tensor, got shape {tuple(classes.shape)} "
                f"and dtype {classes.dtype}; pass the classes returned by sample_classes."
            )
        n = self.counts.long()[classes]  # (B,)
        # The value checks read the classes: on the CPU only (on a GPU each would wait for it; there the
        # classes come from sample_classes, which never draws an empty or out-of-range class).
        if classes.device.type == "cpu":
            if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
                raise ValueError(f"classes must lie in [0, {self.num_classes - 1}].")
            if bool((n == 0).any()):
                raise ValueError("draw_images got a class with no images; such classes cannot be drawn.")
        # float64 keeps floor(u * n) < n exactly for any realistic dataset size (MPS has only float32,
        # where the minimum below keeps it in range); drawn on the CPU.
        u = to_device(torch.rand(classes.shape, generator=generator, dtype=widest_float(classes.device)),
                      classes.device)
        within = torch.minimum((u * n).long(), n - 1)
        return self.sorted_indices[self.offsets[classes] + within]

    def sample_images(self, batch_size: int, generator: torch.Generator, tau: float = 1.0,
                      chunk: int = 1 << 22) -> tuple[Tensor, Tensor]:
        """Draw batch_size images by BALMS's hard straight-through Gumbel-softmax over the N images, logits
        l_{y_i} = log sigmoid(theta_{y_i}). Returns (image indices (B,) int64, weights (B,) float): each weight is
        1 in value and carries the gradient of the drawn image's soft entry s = softmax((l + g) / tau) at it, g
        (B, N) the Gumbel noise. With z = (l + g) / tau, m its row maximum (the drawn image's) and
        T_k = sum over the images j of class k of exp(z_j - m) (in [0, n_k]; the drawn class's >= 1),
        log s = -log sum_k T_k, and d log s / d l_k = (1[k = c] - T_k / sum T) / tau: T (B, C) is kept, as a
        constant, and the gradient comes from l alone. T is summed in fixed point (FIXED_POINT): integers add
        to the same sum in any order, where a GPU's float index_add would not, so every run of a device gives
        the same T. The noise is image_noise's, in rows of about `chunk` values."""
        _check_draw(batch_size, tau)
        logits = F.logsigmoid(self.theta)  # (C,)
        wide = widest_float(logits.device)  # float32 noise would quantise the top Gumbels at iNaturalist's N
        weight = logits.detach().to(wide).exp()[self.labels]  # (N,) sigmoid(theta_{y_i})
        rows = max(1, chunk // max(1, self.labels.numel()))
        drawn, log_t = [], []
        for start in range(0, batch_size, rows):
            b = min(rows, batch_size - start)
            # exp(l + g) = weight / -log(u) for g = -log(-log u): one log, not two and an exp, and in place (the
            # costly part on a CPU); a u of exactly 0 scores 0, never drawn, as its g of -inf would be
            scores = image_noise((b, self.labels.numel()), generator, wide, logits.device).log_().reciprocal_()
            scores.mul_(-weight)  # (b, N)
            idx = scores.argmax(dim=1)  # (b,)
            relative = scores.div_(scores.gather(1, idx.unsqueeze(1)))  # exp(tau * (z - m)), in [0, 1]
            if tau != 1.0:
                relative.pow_(1.0 / tau)
            fixed = relative.mul_(FIXED_POINT).long()  # (b, N)
            sums = torch.zeros((b, self.num_classes), dtype=torch.int64, device=fixed.device)
            sums.index_add_(1, self.labels, fixed)
            drawn.append(idx)
            log_t.append((sums.to(wide) / FIXED_POINT).log().to(logits.dtype))  # (b, C); -inf: no images
        idx, log_t = torch.cat(drawn), torch.cat(log_t)
        shift = (logits - logits.detach()) / tau  # (C,): 0 in value, the gradient in l
        log_soft = shift[self.labels[idx]] - torch.logsumexp(log_t + shift, dim=1)  # (B,)
        soft = log_soft.exp()
        return idx, 1.0 + (soft - soft.detach())

    def draw(self, batch_size: int, generator: torch.Generator, tau: float, relax: str) -> tuple[Tensor, Tensor]:
        """(image indices (B,), straight-through weights (B,)) of one batch under relaxation `relax`
        (RELAXATIONS: image, BALMS's; class, the class-level one)."""
        if relax == "image":
            return self.sample_images(batch_size, generator, tau)
        if relax != "class":
            raise ValueError(f"relax must be one of {', '.join(RELAXATIONS)}, got {relax!r}")
        classes, weights = self.sample_classes(batch_size, generator, tau)
        return self.draw_images(classes, generator), weights

