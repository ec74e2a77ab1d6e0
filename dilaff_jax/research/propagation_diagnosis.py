r"""Measurements of affinity propagation (paper §3.3, Eq. 6–7) on trained runs: where the predicted-affinity sweep
of Tables 3–4 gains or loses mIoU, and which update rules keep it from flooding.

  python -m dilaff_jax.research.propagation_diagnosis --workdir=runs/synthetic [--output=DIR] [--config.KEY=VALUE ...]
  python -m dilaff_jax.research.propagation_diagnosis --workdir=runs/s0,runs/s1,runs/s2 --output=diagnosis/

Each run's latest checkpoint is scored on ``dataset.eval_split`` as evaluation scores it (same inference, same
masks; the config is the run's ``config.json`` or ``--config``, with ``--config.KEY=VALUE`` overrides). Measured:

- affinity accuracy per rate and per distance of the centre pixel to the nearest label boundary, with precision
  and recall of the negative ("different label") signals, which are what stops a class from leaking across a
  boundary, and the mean steep-sigmoid affinity (Eq. 7) the propagation actually weighs each pair with;
- per-class IoU along the sweep, and the pixels that change class between its steps (wrong→right, right→wrong),
  per ground-truth class and per distance to the boundary;
- the mass balance of one step of Eq. 6: the self term ``λ·max p`` against the neighbour mass ``Σ_s a_s`` (one
  term per direction, ``8·|R|`` of them), and the part of it on neighbours of another label;
- sweeps of λ, μ, the rate subset (the affinity channels of the other rates zeroed) and of update rules
  (:data:`RULES`), with the ground-truth oracle for the rules.

With several workdirs (seeds), a summary says per setting whether the predicted sweep is non-decreasing in every
run. Writes ``report.md``, ``report.json`` and ``report.png`` into ``--output`` (default: the first workdir's
``propagation_diagnosis/``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Sequence

from dilaff_jax.process import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dilaff_jax import datasets, errors  # noqa: E402
from dilaff_jax.datasets import input_pipeline  # noqa: E402
from dilaff_jax.engine import config_checks, eval_metrics, inference, run_spec, visualize  # noqa: E402
from dilaff_jax.engine.run_spec import RunSpec  # noqa: E402
from dilaff_jax.method import affinity  # noqa: E402
from dilaff_jax import predict  # noqa: E402
from dilaff_jax.engine import train_state as state  # noqa: E402
from dilaff_jax.method import propagation  # noqa: E402
from dilaff_jax.process import host_memory  # noqa: E402

BIN_EDGES = (2, 4, 8, 16)  # right-closed distance bins (px): [0, 2], (2, 4], (4, 8], (8, 16], (16, inf)
BIN_LABELS = ("0-2", "3-4", "5-8", "9-16", ">16")
# Update rules compared with Eq. 6 (all followed by the normalisation N of Eq. 6; p⁰ is the network's prediction):
#   paper:    λ·p·max p + Σ_s a_s·p_s                      (Eq. 6 as printed, the state p in both terms)
#   anchored: λ·p⁰·max p⁰ + Σ_s a_s·p_s                    (the self term stays the network's prediction, like the
#             unary of a mean-field CRF: iterating converges instead of diffusing away from p⁰)
#   mean:     λ·p·max p + (1/D)·Σ_s a_s·p_s                 (neighbour weights divided by the D = 8·|R| directions)
#   affnorm:  λ·p·max p + Σ_s a_s·p_s / max(Σ_s a_s, 1)     (neighbours as a weighted mean, total weight <= 1)
#   gated:    Eq. 6 where max p⁰ < τ; pixels the network is confident about keep p⁰
RULES = ("paper", "anchored", "mean", "affnorm", "gated")
SWEEP = (0, 1, 3, 6, 10)


class DiagnosisError(errors.UserError):
  """A bad workdir, config or output path; the message names it."""


# ----------------------------------------------------------------------------------------------- measurements


def boundary_distance(labels: np.ndarray, heights: Sequence[int], widths: Sequence[int]) -> np.ndarray:
  """``[B, H, W]`` float: Euclidean distance (px) from each pixel of an image's real ``h x w`` area to the nearest
  pixel of that area with another label (void counts as another label: it marks boundaries); ``inf`` in an image
  of one label, ``nan`` outside the real area."""
  from scipy import ndimage

  labels = np.asarray(labels)
  out = np.full(labels.shape, np.nan)
  for n, (h, w) in enumerate(zip(heights, widths)):
    lab = labels[n, :h, :w]
    d = np.full((h, w), np.inf)
    values = np.unique(lab)
    if values.size > 1:
      for v in values:
        own = lab == v
        d[own] = ndimage.distance_transform_edt(own)[own]
    out[n, :h, :w] = d
  return out


def distance_bins(dist: np.ndarray) -> np.ndarray:
  """Bin index of :data:`BIN_LABELS` per distance (right-closed edges :data:`BIN_EDGES`); -1 for nan."""
  bins = np.digitize(np.nan_to_num(dist, nan=-1.0), BIN_EDGES, right=True)
  return np.where(np.isnan(dist), -1, bins)


def change_counts(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, valid: np.ndarray, bins: np.ndarray, num_classes: int
) -> dict:
  """Pixels (``valid`` only) whose prediction goes wrong→right and right→wrong from ``before`` to ``after``, in
  total, per ground-truth class and per distance bin."""
  right0, right1 = before == labels, after == labels
  out = {}
  for name, sel in (("wrong_to_right", ~right0 & right1), ("right_to_wrong", right0 & ~right1)):
    sel = sel & valid
    out[name] = int(sel.sum())
    out[f"{name}_by_class"] = np.bincount(labels[sel], minlength=num_classes)[:num_classes].tolist()
    out[f"{name}_by_distance"] = np.bincount(bins[sel], minlength=len(BIN_LABELS)).tolist()
  out["changed"] = int(((before != after) & valid).sum())
  return out


def affinity_counts(aff: np.ndarray, labels: np.ndarray, bins: np.ndarray, rates, ignore_label: int) -> dict:
  """Per explicit rate and distance bin of the centre pixel, over the valid pairs (Eq. 1): counts of
  ``[target negative/positive, predicted negative/positive]`` (predicted positive: ``a > 0.5``) ``[R, NB, 2, 2]``,
  and the summed affinity ``a`` on negative and on positive pairs ``[R, NB, 2]``."""
  targets, valid = affinity.affinity_targets(jnp.asarray(labels), rates, ignore_label)
  targets, valid = np.asarray(targets) > 0.5, np.asarray(valid)
  nb = len(BIN_LABELS)
  counts = np.zeros((len(rates), nb, 2, 2), np.int64)
  mass = np.zeros((len(rates), nb, 2))
  for d in range(aff.shape[-1]):
    r = d // affinity.DIRECTIONS_PER_RATE
    v = valid[..., d] & (bins >= 0)
    b, t, a = bins[v], targets[..., d][v].astype(int), aff[..., d][v]
    counts[r] += np.bincount((b * 2 + t) * 2 + (a > 0.5), minlength=nb * 4).reshape(nb, 2, 2)
    mass[r] += np.bincount(b * 2 + t, weights=a, minlength=nb * 2).reshape(nb, 2)
  return {"counts": counts, "mass": mass}


def affinity_table(counts: np.ndarray, mass: np.ndarray) -> dict:
  """Accuracy, precision and recall of the negative signals, and the mean affinity on negative/positive pairs,
  from :func:`affinity_counts` (``None`` where undefined), one list per distance bin."""

  def ratio(n, d):
    return [None if dd == 0 else float(nn / dd) for nn, dd in zip(n, d)]

  tn, fp, fn, tp = counts[:, 0, 0], counts[:, 0, 1], counts[:, 1, 0], counts[:, 1, 1]
  return {
      "accuracy": ratio(tn + tp, counts.sum((1, 2))),
      "negative_precision": ratio(tn, tn + fn),
      "negative_recall": ratio(tn, tn + fp),
      "mean_affinity_negative": ratio(mass[:, 0], tn + fp),
      "mean_affinity_positive": ratio(mass[:, 1], fn + tp),
      "negative_pairs": (tn + fp).tolist(),
      "pairs": counts.sum((1, 2)).tolist(),
  }


def neighbour_mass(probs: np.ndarray, aff: np.ndarray, labels: np.ndarray, rates, ignore_label: int) -> dict:
  """Per pixel, the terms of one step of Eq. 6 (λ apart): ``max p``, ``Σ_s a_s`` (all directions), ``Σ_s a_s``
  over neighbours of another (non-void) label, and ``Σ_s a_s·(1 - p_s[y])``, the neighbour mass voting for a
  class other than the pixel's label ``y``. Neighbours outside the array weigh nothing."""
  b, h, w, c = probs.shape
  offsets = affinity.neighbor_offsets(rates)
  pad = max(max(abs(s), abs(t)) for s, t in offsets)
  lab = np.pad(labels, ((0, 0), (pad, pad), (pad, pad)), constant_values=ignore_label)
  y = np.where(labels == ignore_label, 0, labels)
  p_true = np.take_along_axis(probs, y[..., None], -1)[..., 0]
  pp = np.pad(probs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  inside = np.pad(np.ones((h, w)), pad)
  total, cross, wrong = np.zeros((b, h, w)), np.zeros((b, h, w)), np.zeros((b, h, w))
  for d, (s, t) in enumerate(offsets):
    nl = lab[:, pad + s : pad + s + h, pad + t : pad + t + w]
    a = aff[..., d].astype(np.float64) * inside[pad + s : pad + s + h, pad + t : pad + t + w]
    total += a
    cross += a * ((nl != labels) & (nl != ignore_label))
    ps_y = np.take_along_axis(pp[:, pad + s : pad + s + h, pad + t : pad + t + w], y[..., None], -1)[..., 0]
    wrong += a * (1.0 - ps_y)
  return {"max_p": probs.max(-1), "neighbour": total, "cross": cross, "wrong_vote": wrong, "p_true": p_true}


def mass_table(m: dict, lam: float, valid: np.ndarray, bins: np.ndarray) -> dict:
  """Means per distance bin (and over all valid pixels) of the terms of :func:`neighbour_mass`: the self mass
  ``λ·max p``, its part on the right class ``λ·max p·p[y]``, the neighbour mass, its cross-label part, the wrong
  vote, and the fraction of pixels whose wrong vote outweighs their right self term."""
  terms = {
      "self": lam * m["max_p"],
      "self_right": lam * m["max_p"] * m["p_true"],
      "neighbour": m["neighbour"],
      "cross": m["cross"],
      "wrong_vote": m["wrong_vote"],
      "wrong_vote_exceeds_self_right": (m["wrong_vote"] > lam * m["max_p"] * m["p_true"]).astype(float),
  }
  out = {}
  for name, x in terms.items():
    per_bin = []
    for k in range(len(BIN_LABELS)):
      sel = valid & (bins == k)
      per_bin.append(float(x[sel].mean()) if sel.any() else None)
    out[name] = {"by_distance": per_bin, "all": float(x[valid].mean())}
  return out


# ----------------------------------------------------------------------------------------------- propagation rules


@functools.partial(jax.jit, static_argnames=("offsets", "rule"))
def _rule_steps(p, p0, aff, offsets, rule, lam, tau, iterations):
  """``iterations`` steps of an update rule of :data:`RULES` from state ``p`` (``p0``: the network's prediction)."""
  _, h, w, _ = p.shape
  pad = max(max(abs(s), abs(t)) for s, t in offsets)
  conf0 = p0.max(-1, keepdims=True)

  def step(_, q):
    qp = jnp.pad(q, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    nb = 0.0
    for d, (s, t) in enumerate(offsets):
      nb = nb + aff[..., d : d + 1] * qp[:, pad + s : pad + s + h, pad + t : pad + t + w]
    if rule == "mean":
      nb = nb / len(offsets)
    elif rule == "affnorm":
      nb = nb / jnp.maximum(aff.sum(-1, keepdims=True), 1.0)
    base = p0 if rule == "anchored" else q
    un = lam * base * base.max(-1, keepdims=True) + nb
    out = un / jnp.maximum(un.sum(-1, keepdims=True), np.finfo(np.float32).tiny)
    if rule == "gated":
      out = jnp.where(conf0 >= tau, p0, out)
    return out

  return jax.lax.fori_loop(0, iterations, step, p)


def propagate_rule(
    p, p0, aff, rates, rule: str = "paper", lam: float = 6.0, tau: float = 0.9, iterations: int = 1
) -> jax.Array:
  """``iterations`` steps of ``rule`` (:data:`RULES`) from state ``p``; ``paper`` is :func:`propagation.propagate`."""
  if rule not in RULES:
    raise ValueError(f"unknown propagation rule {rule!r}; known: {', '.join(RULES)}")
  if iterations == 0:
    return jnp.asarray(p)
  if rule == "paper":
    return propagation.propagate(p, aff, rates, lam=lam, iterations=iterations)
  return _rule_steps(
      jnp.asarray(p),
      jnp.asarray(p0),
      jnp.asarray(aff),
      affinity.neighbor_offsets(rates),
      rule,
      jnp.float32(lam),
      jnp.float32(tau),
      jnp.int32(iterations),
  )


# ----------------------------------------------------------------------------------------------- data


def collect(spec: RunSpec, variables) -> dict:
  """The eval split's real images through the network as evaluation runs it: probabilities ``[N, H, W, C]``,
  affinity logits ``x`` of Eq. 7 (recovered from the steep sigmoid; exact for single-scale, unflipped inference)
  and the mask of neighbours inside each real image ``[N, H, W, D]``, labels (void outside the image), sizes."""
  config, rates = spec.config, spec.rates
  model = state.build_model(spec, axis_name=None)
  pipes = input_pipeline.eval_from_config(config.dataset, local_device_count=1, per_device_batch=config.eval.batch_size)
  fn = None
  parts = {k: [] for k in ("probs", "logits", "inside", "label", "height", "width")}
  seen = 0
  limit = int(config.eval.max_images) or None
  for batch in pipes.make_eval():
    keep = np.flatnonzero(np.asarray(batch["mask"][0]))
    if limit is not None:
      keep = keep[: max(limit - seen, 0)]
    if keep.size == 0:
      break
    images = jnp.asarray(batch["image"][0][keep])
    size = images.shape[1:3]
    if fn is None:
      fn = jax.jit(
          functools.partial(
              inference.predict,
              model.apply,
              size=size,
              output_stride=config.eval.output_stride,
              scales=tuple(config.eval.scales),
              flip=bool(config.eval.flip),
              rates=rates,
              mu=float(config.affinity.mu),
          )
      )
    probs, aff = fn(variables, images)
    heights, widths = np.asarray(batch["height"][0][keep]), np.asarray(batch["width"][0][keep])
    a = np.clip(np.asarray(aff, np.float64), 1e-30, 1 - 1e-7)
    parts["logits"].append(((np.log(a) - np.log1p(-a)) / math.log(config.affinity.mu)).astype(np.float32))
    parts["inside"].append(np.asarray(inference.inside_mask(jnp.asarray(heights), jnp.asarray(widths), size, rates)))
    parts["probs"].append(np.asarray(probs, np.float32))
    parts["label"].append(np.asarray(batch["label"][0][keep]).astype(np.int32))
    parts["height"].append(heights)
    parts["width"].append(widths)
    seen += keep.size
    print(f"[diagnosis] network: {seen} images", flush=True)
  if not seen:
    raise DiagnosisError(f"dataset {config.dataset.name}: split {config.dataset.eval_split} has no images")
  return {k: np.concatenate(v) for k, v in parts.items()}


def affinity_for(data: dict, mu: float, rate_subset: Sequence[int] | None = None) -> np.ndarray:
  """Steep-sigmoid affinity (Eq. 7) with ``mu``, zero outside the image and on the channels of rates (indices
  into the explicit rates) not in ``rate_subset``."""
  a = np.asarray(propagation.steep_sigmoid(jnp.asarray(data["logits"]), mu)) * data["inside"]
  if rate_subset is not None:
    keep = np.zeros(a.shape[-1], bool)
    for r in rate_subset:
      keep[r * 8 : (r + 1) * 8] = True
    a = a * keep
  return a.astype(np.float32)


def run_sweep(
    data: dict,
    aff: np.ndarray,
    rates,
    num_classes: int,
    *,
    rule: str = "paper",
    lam: float = 6.0,
    tau: float = 0.9,
    iterations: Sequence[int] = SWEEP,
    keep_preds: bool = False,
    batch: int = 10,
) -> dict:
  """Confusion matrices (and with ``keep_preds`` the predictions) at each iteration count of ``iterations``."""
  labels, valid = data["label"], data["valid"]
  its = sorted(iterations)
  confs = np.zeros((len(its), num_classes, num_classes), np.int64)
  preds = np.zeros((len(its), *labels.shape), np.uint8) if keep_preds else None
  for lo in range(0, labels.shape[0], batch):
    sl = slice(lo, lo + batch)
    p0 = jnp.asarray(data["probs"][sl])
    a = jnp.asarray(aff[sl])
    p, done = p0, 0
    for k, it in enumerate(its):
      p = propagate_rule(p, p0, a, rates, rule, lam, tau, it - done)
      done = it
      pred = np.asarray(jnp.argmax(p, -1))
      confs[k] += eval_metrics.confusion_matrix_np(labels[sl], pred, num_classes, valid[sl])
      if keep_preds:
        preds[k, sl] = pred
  return {"iterations": its, "confusions": confs, "preds": preds}


def _mious(sweep: dict) -> list[float]:
  return [eval_metrics.mean_iou(c) for c in sweep["confusions"]]


# ----------------------------------------------------------------------------------------------- one run


def diagnose(spec: RunSpec, data: dict, class_names: Sequence[str]) -> dict:
  """Every measurement of the module docstring on ``data`` (:func:`collect`) of one run."""
  config, rates = spec.config, spec.rates
  c = config.dataset.num_classes
  ign = config.dataset.ignore_label
  lam, mu = float(config.affinity.lam), float(config.affinity.mu)
  labels = data["label"]
  data["valid"] = labels != ign
  dist = boundary_distance(labels, data["height"], data["width"])
  bins = distance_bins(dist)
  valid = data["valid"]
  aff = affinity_for(data, mu)
  oracle = np.asarray(propagation.gt_affinity(jnp.asarray(labels), rates, ign))
  out = {
      "rates": [affinity.rate_label(r) for r in rates],
      "lam": lam,
      "mu": mu,
      "partial_neighbors": config.affinity.get("partial_neighbors", ""),
      "num_images": int(labels.shape[0]),
      "class_names": list(class_names),
      "distance_bins": list(BIN_LABELS),
      "pixels_by_distance": np.bincount(bins[valid], minlength=len(BIN_LABELS)).tolist(),
  }

  print("[diagnosis] the paper's sweep", flush=True)
  main = run_sweep(data, aff, rates, c, lam=lam, keep_preds=True)
  out["sweep"] = {
      "iterations": list(SWEEP),
      "predicted": _mious(main),
      "oracle": _mious(run_sweep(data, oracle, rates, c, lam=lam)),
      "per_class_iou": [
          [None if np.isnan(v) else float(v) for v in eval_metrics.iou_from_confusion(cf)] for cf in main["confusions"]
      ],
  }
  out["changes"] = []
  for k in range(1, len(SWEEP)):
    ch = change_counts(main["preds"][k - 1], main["preds"][k], labels, valid, bins, c)
    out["changes"].append({"from": SWEEP[k - 1], "to": SWEEP[k], **ch})
  ch = change_counts(main["preds"][0], main["preds"][-1], labels, valid, bins, c)
  out["changes_total"] = {"from": SWEEP[0], "to": SWEEP[-1], **ch}
  # accuracy of the network's own prediction per distance bin (where the errors are before propagation)
  right = (main["preds"][0] == labels) & valid
  out["pixel_accuracy_by_distance"] = [
      float(right[bins == k].sum() / max((valid & (bins == k)).sum(), 1)) for k in range(len(BIN_LABELS))
  ]
  del main

  print("[diagnosis] affinity accuracy and mass balance", flush=True)
  acc = affinity_counts(aff, labels, bins, rates, ign)
  out["affinity"] = {
      affinity.rate_label(r): affinity_table(acc["counts"][i], acc["mass"][i]) for i, r in enumerate(rates)
  }
  out["affinity"]["all"] = affinity_table(acc["counts"].sum(0), acc["mass"].sum(0))
  out["mass"] = mass_table(neighbour_mass(data["probs"], aff, labels, rates, ign), lam, valid, bins)
  out["mass"]["directions"] = len(affinity.neighbor_offsets(rates))
  out["mass"]["oracle"] = mass_table(neighbour_mass(data["probs"], oracle, labels, rates, ign), lam, valid, bins)

  variants = {}
  print("[diagnosis] λ sweep", flush=True)
  variants["lambda"] = {
      f"λ={v:g}": _mious(run_sweep(data, aff, rates, c, lam=v))
      for v in sorted({1.0, 3.0, lam, 12.0, 24.0, 48.0, 96.0, 192.0})
  }
  print("[diagnosis] μ sweep", flush=True)
  variants["mu"] = {
      f"μ={v:g}": _mious(run_sweep(data, affinity_for(data, v), rates, c, lam=lam))
      for v in sorted({2.0, math.e, mu, 20.0, 100.0})
  }
  print("[diagnosis] rate subsets", flush=True)
  names = [affinity.rate_label(r) for r in rates]
  subsets = {f"only {n}": [i] for i, n in enumerate(names)}
  if len(rates) > 2:
    subsets.update({f"without {n}": [j for j in range(len(rates)) if j != i] for i, n in enumerate(names)})
  variants["rates"] = {
      name: _mious(run_sweep(data, affinity_for(data, mu, sub), rates, c, lam=lam)) for name, sub in subsets.items()
  }
  print("[diagnosis] update rules", flush=True)
  n_rates = len(rates)
  rules = {
      "paper": ("paper", lam),
      f"paper, λ·|R| = {lam * n_rates:g}": ("paper", lam * n_rates),
      "anchored": ("anchored", lam),
      f"anchored, λ·|R| = {lam * n_rates:g}": ("anchored", lam * n_rates),
      "mean (÷D)": ("mean", lam),
      "affnorm (÷Σa)": ("affnorm", lam),
      "gated τ=0.9": ("gated", lam),
  }
  variants["rules"] = {}
  variants["rules_oracle"] = {}
  for name, (rule, lv) in rules.items():
    variants["rules"][name] = _mious(run_sweep(data, aff, rates, c, rule=rule, lam=lv))
    variants["rules_oracle"][name] = _mious(run_sweep(data, oracle, rates, c, rule=rule, lam=lv))
  out["variants"] = variants
  return out


# ----------------------------------------------------------------------------------------------- reports


def non_decreasing(values: Sequence[float]) -> bool:
  return all(b >= a for a, b in zip(values, values[1:]))


def summarize(runs: Sequence[dict]) -> dict:
  """Per variant family and setting: the predicted sweeps of every run, their mean, and whether the sweep is
  non-decreasing in every run, with the mean gain at 1 and 10 iterations over 0."""
  out = {}
  for family in runs[0]["variants"]:
    out[family] = {}
    for name in runs[0]["variants"][family]:
      sweeps = np.array([r["variants"][family][name] for r in runs])
      out[family][name] = {
          "mean": sweeps.mean(0).tolist(),
          "std": sweeps.std(0, ddof=1).tolist() if len(runs) > 1 else [0.0] * sweeps.shape[1],
          "non_decreasing_all": bool(all(map(non_decreasing, sweeps))),
          "gain_1": float((sweeps[:, 1] - sweeps[:, 0]).mean()),
          "gain_10": float((sweeps[:, -1] - sweeps[:, 0]).mean()),
      }
  return out


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.2f}"


def _f(v, digits=2) -> str:
  return "-" if v is None else f"{v:.{digits}f}"


def _markdown(runs: Sequence[dict], summary: dict) -> str:
  lines = [
      "# Propagation diagnosis",
      "",
      f"{len(runs)} run(s); sweep over iterations {', '.join(map(str, SWEEP))}; mIoU in %. Distance: Euclidean "
      "distance (px) of the pixel to the nearest pixel of another label (void included), bins "
      + ", ".join(BIN_LABELS)
      + ".",
      "",
      "## Summary over runs (predicted affinity; the family rules_oracle: ground-truth affinity)",
      "",
      "| family | setting | " + " | ".join(f"{i} it." for i in SWEEP) + " | gain @1 | gain @10 | "
      "non-decreasing in every run |",
      "|---|---|" + "---|" * (len(SWEEP) + 3),
  ]
  for family, settings in summary.items():
    for name, s in settings.items():
      cells = " | ".join(f"{100 * m:.2f} ± {100 * sd:.2f}" for m, sd in zip(s["mean"], s["std"]))
      lines.append(
          f"| {family} | {name} | {cells} | {100 * s['gain_1']:+.2f} | {100 * s['gain_10']:+.2f} | "
          f"{'yes' if s['non_decreasing_all'] else 'no'} |"
      )
  lines.append("")
  for r in runs:
    names = r["class_names"]
    lines += [
        f"## Run {r['workdir']} (step {r['step']}, {r['num_images']} images, R = {{{', '.join(r['rates'])}}}, "
        f"λ = {r['lam']:g}, μ = {r['mu']:g}, n_k rule {r['partial_neighbors']})",
        "",
        "| | " + " | ".join(f"{i} it." for i in SWEEP) + " |",
        "|---|" + "---|" * len(SWEEP),
        "| predicted | " + " | ".join(map(_pct, r["sweep"]["predicted"])) + " |",
        "| oracle | " + " | ".join(map(_pct, r["sweep"]["oracle"])) + " |",
    ]
    for k, name in enumerate(names):
      lines.append(f"| IoU {name} | " + " | ".join(_pct(row[k]) for row in r["sweep"]["per_class_iou"]) + " |")
    lines += [
        "",
        "Pixels changing class (predicted affinity): wrong→right / right→wrong, per distance bin",
        "",
        "| step | total | " + " | ".join(BIN_LABELS) + " | by class (w→r / r→w) |",
        "|---|---|" + "---|" * len(BIN_LABELS) + "---|",
    ]
    for ch in [*r["changes"], r["changes_total"]]:
      cells = " | ".join(
          f"{a} / {b}" for a, b in zip(ch["wrong_to_right_by_distance"], ch["right_to_wrong_by_distance"])
      )
      by_class = ", ".join(
          f"{n} {a}/{b}" for n, a, b in zip(names, ch["wrong_to_right_by_class"], ch["right_to_wrong_by_class"])
      )
      lines.append(
          f"| {ch['from']}→{ch['to']} | {ch['wrong_to_right']} / {ch['right_to_wrong']} | {cells} | " f"{by_class} |"
      )
    lines += [
        "",
        "Valid pixels per distance bin: "
        + ", ".join(f"{b}: {n}" for b, n in zip(BIN_LABELS, r["pixels_by_distance"]))
        + "; the network's pixel accuracy per bin: "
        + ", ".join(f"{100 * v:.1f}%" for v in r["pixel_accuracy_by_distance"]),
        "",
        "Affinity per rate and distance bin of the centre pixel: accuracy / negative-signal precision / "
        "negative-signal recall / mean steep-σ affinity on negative pairs (the weight of a leak)",
        "",
        "| rate | " + " | ".join(BIN_LABELS) + " |",
        "|---|" + "---|" * len(BIN_LABELS),
    ]
    for rate, t in r["affinity"].items():
      cells = [
          f"{_pct(a)} / {_pct(p)} / {_pct(rc)} / {_f(m)}"
          for a, p, rc, m in zip(
              t["accuracy"], t["negative_precision"], t["negative_recall"], t["mean_affinity_negative"]
          )
      ]
      lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    m = r["mass"]
    lines += [
        "",
        f"Mass balance of one step of Eq. 6 ({m['directions']} directions, λ = {r['lam']:g}); means per "
        "distance bin, predicted affinity (oracle in brackets)",
        "",
        "| term | all | " + " | ".join(BIN_LABELS) + " |",
        "|---|---|" + "---|" * len(BIN_LABELS),
    ]
    for term, label in (
        ("self", "λ·max p"),
        ("self_right", "λ·max p·p[y]"),
        ("neighbour", "Σ a_s"),
        ("cross", "Σ a_s, other label"),
        ("wrong_vote", "Σ a_s·(1 − p_s[y])"),
        ("wrong_vote_exceeds_self_right", "fraction wrong vote > λ·max p·p[y]"),
    ):
      pr, orc = m[term], m["oracle"][term]
      cells = " | ".join(f"{_f(a)} ({_f(b)})" for a, b in zip(pr["by_distance"], orc["by_distance"]))
      lines.append(f"| {label} | {_f(pr['all'])} ({_f(orc['all'])}) | {cells} |")
    lines += [
        "",
        "Oracle sweeps of the update rules",
        "",
        "| rule | " + " | ".join(f"{i} it." for i in SWEEP) + " |",
        "|---|" + "---|" * len(SWEEP),
    ]
    for name, v in r["variants"]["rules_oracle"].items():
      lines.append(f"| {name} | " + " | ".join(map(_pct, v)) + " |")
    lines.append("")
  return "\n".join(lines) + "\n"


def _nanmean(x: np.ndarray) -> np.ndarray:
  """Mean over runs (axis 0) of the defined entries; nan where none is."""
  n = (~np.isnan(x)).sum(0)
  return np.where(n > 0, np.nansum(x, 0) / np.maximum(n, 1), np.nan)


def _plot(runs: Sequence[dict], summary: dict, path: str) -> None:
  plt = visualize.pyplot()

  fig, axes = plt.subplots(1, 4, figsize=(19, 4.2), dpi=75)
  for ax, family in zip(axes[:2], ("lambda", "rules")):
    for name, s in summary[family].items():
      ax.errorbar(SWEEP, 100 * np.array(s["mean"]), yerr=100 * np.array(s["std"]), marker="o", capsize=2, label=name)
    ax.set_title(f"predicted sweep: {family} (mean ± std over {len(runs)} run(s))", fontsize=9)
    ax.set_xlabel("iterations")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  x = np.arange(len(BIN_LABELS))
  ax = axes[2]
  for rate in runs[0]["affinity"]:
    rec = np.array([[np.nan if v is None else v for v in r["affinity"][rate]["negative_recall"]] for r in runs])
    ax.plot(x, 100 * _nanmean(rec), marker="o", label="all rates" if rate == "all" else f"rate {rate}")
  ax.set_xticks(x, BIN_LABELS)
  ax.set_xlabel("distance of the centre pixel to a boundary (px)")
  ax.set_ylabel("recall of 'different label' (%)")
  ax.set_title("negative-signal recall by rate", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax = axes[3]
  for term, label in (
      ("self_right", "λ·max p·p[y]"),
      ("neighbour", "Σ a_s"),
      ("wrong_vote", "Σ a_s(1−p_s[y])"),
      ("cross", "Σ a_s, other label"),
  ):
    vals = np.array([[np.nan if v is None else v for v in r["mass"][term]["by_distance"]] for r in runs])
    ax.plot(x, _nanmean(vals), marker="o", label=label)
  ax.set_xticks(x, BIN_LABELS)
  ax.set_xlabel("distance to a boundary (px)")
  ax.set_title("mass of one step of Eq. 6 (predicted affinity)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(runs: Sequence[dict], output: str) -> dict:
  """``report.{md,json,png}`` in ``output``; returns the summary."""
  summary = summarize(runs)
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "report.json"), "w") as f:
    json.dump({"summary": summary, "runs": list(runs)}, f, indent=1)
  with open(os.path.join(output, "report.md"), "w") as f:
    f.write(_markdown(runs, summary))
  _plot(runs, summary, os.path.join(output, "report.png"))
  return summary


# ----------------------------------------------------------------------------------------------- command line


def diagnose_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores the latest checkpoint of ``workdir`` and runs :func:`diagnose` on the eval split."""
  config_checks.validate(config, num_devices=1, mode="evaluate")
  spec = run_spec.derive(config)
  if not spec.rates:
    raise DiagnosisError(
        f"--workdir={workdir}: the run has no affinity head (affinity.enabled is false): " "nothing to propagate"
    )
  variables, step = state.restore_variables(spec, workdir)
  data = collect(spec, variables)
  names = datasets.class_names(
      datasets.get_builder(
          config.dataset.name, data_dir=config.dataset.get("data_dir"), manual_dir=config.dataset.get("manual_dir")
      )
  )
  out = diagnose(spec, data, names)
  out.update({"workdir": os.path.basename(os.path.normpath(workdir)), "step": step})  # no machine paths in reports
  return out


def _config_for(workdir: str, config_file: str | None, argv: Sequence[str]) -> ml_collections.ConfigDict:
  try:
    config = config_file if config_file else predict.load_json_config(workdir)
  except predict.PredictError as e:
    raise DiagnosisError(str(e)) from None
  fv = flags.FlagValues()
  if isinstance(config, str):
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=list(argv))
  else:
    config_flags.DEFINE_config_dict("config", config, "", flag_values=fv, sys_argv=list(argv))
  for name in ("workdir", "output"):
    flags.DEFINE_string(name, None, "", flag_values=fv)
  try:
    fv(list(argv))
  except flags.Error as e:
    raise DiagnosisError(str(e)) from None
  except KeyError as e:
    raise DiagnosisError(f"a --config override names no key of the config: {e.args[0]}") from None
  except (OSError, SyntaxError, ImportError) as e:
    raise DiagnosisError(f"--config={config_file}: cannot load the config file: {e}") from None
  return fv.config


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry; returns the exit status (2 for bad input, with the message on stderr)."""
  argv = ["propagation_diagnosis", *(sys.argv[1:] if argv is None else argv)]
  logging.set_verbosity(logging.WARNING)
  try:
    host_memory.reuse_freed_memory()
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR
  first = flags.FlagValues()
  flags.DEFINE_string(
      "workdir", None, "Training workdir(s), comma-separated (e.g. the seeds of one setting).", flag_values=first
  )
  flags.DEFINE_string(
      "output",
      None,
      "Folder for report.{md,json,png} (default <first workdir>/propagation_" "diagnosis).",
      flag_values=first,
  )
  flags.DEFINE_string(
      "config",
      None,
      "Config file (default: each workdir's config.json); --config.KEY=VALUE " "overrides either.",
      flag_values=first,
  )
  try:
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
      print(__doc__ + "\nFlags:\n" + first.get_help())
      return 0
    try:
      first(argv, known_only=True)
    except flags.Error as e:
      raise DiagnosisError(str(e)) from None
    if not first.workdir:
      raise DiagnosisError(
          "--workdir is required (python -m dilaff_jax.research.propagation_diagnosis --workdir=RUN[,RUN...])"
      )
    workdirs = [w for w in first.workdir.split(",") if w]
    output = first.output or os.path.join(workdirs[0], "propagation_diagnosis")
    if os.path.exists(output) and not os.path.isdir(output):
      raise DiagnosisError(f"--output={output} is a file, not a folder: give a folder for the report")
    if first.config and not os.path.isfile(first.config.split(":")[0]):
      raise DiagnosisError(f"--config={first.config}: no such config file")
    rest = [a for a in argv if not a.startswith(("--workdir", "--output"))]
    runs = []
    for w in workdirs:
      config = _config_for(w, first.config, rest)
      print(f"[diagnosis] {w}", flush=True)
      runs.append(diagnose_workdir(config, w))
    write_report(runs, output)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR
  print(f"[diagnosis] report written to {output}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
