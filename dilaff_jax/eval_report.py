"""The Markdown page of an evaluation (``results.md``), written next to its ``results.json``."""

from __future__ import annotations

from collections.abc import Sequence


def _iterations(n: int) -> str:
  return f"{n} iteration" + ("" if n == 1 else "s")


def markdown(results: dict, class_names: Sequence[str]) -> str:
  """``results.md``: the propagation sweep (the layout of the paper's Tables 3–4), the mIoU with and without
  propagation, the IoU per class, Fig. 4's affinity accuracy per rate and n_k, the dense CRF's score (Table 5) and
  the throughput, from the ``results`` dict ``evaluate.evaluate_state`` writes as ``results.json``."""
  lines = [f"# Evaluation of step {results['step']} on {results['split']} ({results['num_images']} images)", ""]
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
  lines += ["| class | IoU |", "|---|---|"]
  for name, v in zip(class_names, results["per_class_iou"]):
    lines.append(f"| {name} | {'n/a' if v is None else f'{100 * v:.2f}%'} |")
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
