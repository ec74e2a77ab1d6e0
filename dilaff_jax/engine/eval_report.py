"""What an evaluation reports: ``results.json``, its Markdown page ``results.md``, Fig. 4's PNG and the summaries."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from dilaff_jax import errors
from dilaff_jax.engine import eval_metrics, visualize
from dilaff_jax.method import conventions
from dilaff_jax.process import files

# the predictions :func:`class_fields` scores, and the suffix of their keys in ``results.json``
SCORED = {"no_propagation": "", "propagated": "_propagated", "crf": "_crf"}


class NoLabelledPixelsError(errors.UserError, ValueError):
  """The evaluation split has no labelled pixel (every label is 255): there is nothing to score."""


def _iterations(n: int) -> str:
  return f"{n} iteration" + ("" if n == 1 else "s")


def _optional(values: np.ndarray) -> list:
  return [None if np.isnan(v) else float(v) for v in values]


def evaluation_warnings(num_images: int, absent: Sequence[dict]) -> list[str]:
  """The warnings ``results.md`` opens with: a small evaluation set, and the classes absent from its labels."""
  out = []
  if num_images < conventions.MIN_EVAL_IMAGES:
    out.append(
        f"only {num_images} evaluation image(s) (fewer than {conventions.MIN_EVAL_IMAGES}): one image can move these"
        " scores by several points; put more images in the validation split"
    )
  if absent:
    out.append(
        f"{len(absent)} class(es) have no pixel in the evaluation labels ({', '.join(a['name'] for a in absent)}): "
        "their IoU and accuracy are undefined, so every mean here (mIoU, mAcc of every column, the oracle and the "
        "CRF) is over the other classes alone; their false-positive pixels are listed below"
    )
  return out


def check_labelled(conf: np.ndarray, split: str) -> np.ndarray:
  """The classes present in the labels of ``conf`` (``eval_metrics.present_classes``); none is
  :class:`NoLabelledPixelsError`."""
  present = eval_metrics.present_classes(conf)
  if not present.any():
    raise NoLabelledPixelsError(
        f"the evaluation split {split!r} has no labelled pixel (every label is 255): set dataset.eval_split to a "
        "split with masks"
    )
  return present


def class_fields(matrices: dict[str, np.ndarray], class_names: Sequence[str], num_images: int, split: str) -> dict:
  """The scores of ``results.json`` from the confusion matrices of the predictions in :data:`SCORED` (at least
  ``no_propagation``): ``miou``, ``macc``, ``aacc`` (and ``miou_propagated`` ... ``aacc_crf``), all over the same
  classes, those with ground-truth pixels (``scored_classes``); ``absent_classes`` with each prediction's
  false-positive pixels; per-class IoU, accuracy and ground-truth pixels of ``no_propagation``; ``warnings``."""
  base = np.asarray(matrices["no_propagation"])
  present = check_labelled(base, split)
  out = {}
  for name, conf in matrices.items():
    suffix = SCORED[name]
    out["miou" + suffix] = eval_metrics.mean_iou(conf, present)
    out["macc" + suffix] = eval_metrics.mean_accuracy(conf, present)
    out["aacc" + suffix] = eval_metrics.overall_accuracy(conf)
  absent = [
      {
          "id": int(k),
          "name": class_names[k],
          "false_positive_pixels": {name: int(np.asarray(conf)[:, k].sum()) for name, conf in matrices.items()},
      }
      for k in np.flatnonzero(~present)
  ]
  out.update(
      class_names=list(class_names),
      scored_classes=[class_names[k] for k in np.flatnonzero(present)],
      absent_classes=absent,
      per_class_iou=_optional(eval_metrics.iou_from_confusion(base)),
      per_class_accuracy=_optional(eval_metrics.accuracy_from_confusion(base)),
      class_pixels=[int(v) for v in base.sum(1)],
      warnings=evaluation_warnings(num_images, absent),
  )
  return out


def _pct(v) -> str:
  return "n/a" if v is None else f"{100 * v:.2f}%"


def _class_table(results: dict, class_names: Sequence[str]) -> list[str]:
  """Per class: IoU, accuracy and ground-truth pixels; a class absent from the labels says so, with its
  false-positive pixels."""
  absent = {a["id"]: a for a in results.get("absent_classes", ())}
  accuracy = results.get("per_class_accuracy") or [None] * len(class_names)
  pixels = results.get("class_pixels") or [None] * len(class_names)
  lines = ["| class | IoU | accuracy | ground-truth pixels |", "|---|---|---|---|"]
  for k, (name, iou, acc, n) in enumerate(zip(class_names, results["per_class_iou"], accuracy, pixels)):
    if k in absent:
      fp = ", ".join(f"{v} ({p.replace('_', ' ')})" for p, v in absent[k]["false_positive_pixels"].items())
      lines.append(f"| {name} | absent from the ground truth: not scored | - | 0; false positives: {fp} |")
    else:
      lines.append(f"| {name} | {_pct(iou)} | {_pct(acc)} | {'' if n is None else n} |")
  return lines


def markdown(results: dict, class_names: Sequence[str]) -> str:
  """``results.md``: its warnings (:func:`evaluation_warnings`), the propagation sweep (the layout of the paper's
  Tables 3–4), the mIoU with and without propagation, mAcc and aAcc, the IoU and accuracy per class (absent classes
  named, with their false positives), Fig. 4's affinity accuracy per rate and n_k, the dense CRF's score (Table 5) and
  the throughput, from the ``results`` dict ``evaluate.evaluate_state`` writes as ``results.json``."""
  lines = [f"# Evaluation of step {results['step']} on {results['split']} ({results['num_images']} images)", ""]
  lines += [f"> **Warning:** {w}" + "\n" for w in results.get("warnings", ())]
  sweep = results.get("sweep")
  if sweep:
    its = list(sweep["iterations"])
    lines += ["| Iteration times | " + " | ".join(map(str, its)) + " |", "|---|" + "---|" * len(its)]
    for name, label in (("predicted", "Refine with predicted affinity"), ("oracle", "Refine with ground truth")):
      if name in sweep:
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.2f}%" for v in sweep[name]) + " |")
    if "oracle" in sweep:
      lines += [
          "",
          "The ground-truth row propagates with the affinity of the evaluation labels themselves (target ·"
          " valid, Eq. 1), starting from the same prediction: at 0 iterations it equals the unrefined mIoU by"
          " construction (the paper's printed oracle row does not; see docs/conventions.md).",
      ]
    lines.append("")
  lines += [
      f"mIoU (no propagation): **{100 * results['miou']:.2f}%**"
      + (
          f"; with {_iterations(results['final_iterations'])} of propagation: "
          f"**{100 * results['miou_propagated']:.2f}%**"
          if "miou_propagated" in results
          else ""
      ),
      "",
  ]
  for suffix, label in (("", "no propagation"), ("_propagated", "propagated"), ("_crf", "dense CRF")):
    if "macc" + suffix in results:
      lines.append(f"mAcc ({label}): {_pct(results['macc' + suffix])}, aAcc: {_pct(results['aacc' + suffix])}  ")
  if "scored_classes" in results:
    lines += [
        "",
        f"Every mean (each column of the sweep, the oracle, the CRF, mIoU and mAcc) is over the same "
        f"{len(results['scored_classes'])} of {len(class_names)} classes: those with ground-truth pixels.",
    ]
  lines += [""] + _class_table(results, class_names)
  acc = results.get("affinity_accuracy")
  if acc:
    lines += [
        "",
        "Affinity accuracy per neighbour category (Fig. 4)",
        "",
        "| rate | " + " | ".join(f"n{k}" for k in range(9)) + " |",
        "|---|" + "---|" * 9,
    ]
    for rate, row in acc["per_rate"].items():
      lines.append(f"| {rate} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in row) + " |")
    lines.append("| mean | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in acc["mean"]) + " |")
  if "miou_crf" in results:
    lines += [
        "",
        f"Dense CRF on the same predictions (Table 5): **{100 * results['miou_crf']:.2f}%**, "
        f"{results['crf_ms_per_image']:.0f} ms per image",
    ]
  lines += ["", f"Throughput: {results['images_per_second']:.2f} images/s (network, propagation sweep and scoring)"]
  return "\n".join(lines) + "\n"


def scalars(results: dict) -> dict[str, float]:
  """The summaries of an evaluation: mIoU, mAcc and aAcc, with the dense CRF and after the configured propagation,
  and the mIoU along the sweep (predicted and oracle affinity)."""
  out = {"eval/miou": results["miou"]}
  for key in ("macc", "aacc"):
    for suffix in SCORED.values():
      if key + suffix in results:
        out[f"eval/{key}{suffix}"] = results[key + suffix]
  if "miou_crf" in results:
    out["eval/miou_crf"] = results["miou_crf"]
  sweep = results.get("sweep")
  if sweep:
    out["eval/miou_propagated"] = results["miou_propagated"]
    for it, v in zip(sweep["iterations"], sweep["predicted"]):
      out[f"eval/miou_propagation_{it}"] = v
    for it, v in zip(sweep["iterations"], sweep.get("oracle", [])):
      out[f"eval/miou_oracle_{it}"] = v
  return out


def write(results: dict, out_dir: str, class_names: Sequence[str], writer=None) -> None:
  """Writes ``results.json``, ``results.md`` and (with affinity) ``affinity_accuracy.png`` to ``out_dir``, prints
  the Markdown and, with a CLU ``writer``, its :func:`scalars` at the evaluated step."""
  os.makedirs(out_dir, exist_ok=True)
  files.write_atomic(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
  md = markdown(results, class_names)
  files.write_atomic(os.path.join(out_dir, "results.md"), md)
  if "affinity_accuracy" in results:
    visualize.plot_affinity_accuracy(
        results["affinity_accuracy"],
        os.path.join(out_dir, "affinity_accuracy.png"),
        f"Affinity accuracy per n_k, step {results['step']}",
    )
  print(md, flush=True)
  if writer is not None:
    writer.write_scalars(results["step"], scalars(results))
    writer.flush()
