"""What an evaluation reports: ``results.json``, its Markdown page ``results.md``, Fig. 4's PNG and the summaries."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from dilaff_jax.engine import visualize
from dilaff_jax.process import files


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


def scalars(results: dict) -> dict[str, float]:
  """The summaries of an evaluation: mIoU, with the dense CRF, after the configured propagation and along the sweep
  (predicted and oracle affinity)."""
  out = {"eval/miou": results["miou"]}
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
