"""Propagation diagnosis: its measurements against brute-force loops on hand-made cases, its update rules against
a brute-force Eq. 6 loop, and one command-line run on a tiny trained run (checked against evaluation's sweep)."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dilaff_jax.research import propagation_diagnosis as pd
from test_affinity import IGN, brute_offsets, brute_targets
from test_train import tiny_config

RATES = ((1, 2), (3, 3))


def scene():
  """Two 7x9 images (the second padded: real area 5x6) with a square, a void band and a one-label image."""
  lab = np.full((2, 7, 9), IGN, np.int32)
  lab[0] = 0
  lab[0, 2:5, 3:7] = 2
  lab[0, 2:5, 2] = IGN
  lab[0, 6, 0] = 1
  lab[1, :5, :6] = 3
  return lab, [7, 5], [9, 6]


def brute_distance(lab, heights, widths):
  out = np.full(lab.shape, np.nan)
  for n, (h, w) in enumerate(zip(heights, widths)):
    for i in range(h):
      for j in range(w):
        best = math.inf
        for ii in range(h):
          for jj in range(w):
            if lab[n, ii, jj] != lab[n, i, j]:
              best = min(best, math.hypot(ii - i, jj - j))
        out[n, i, j] = best
  return out


def test_boundary_distance_and_bins_match_brute_force():
  lab, hs, ws = scene()
  got = pd.boundary_distance(lab, hs, ws)
  want = brute_distance(lab, hs, ws)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)])
  assert got[0, 3, 4] == 2.0 and got[0, 0, 7] == pytest.approx(math.hypot(2, 1))  # inside the square; off its corner
  assert np.isinf(got[1, :5, :6]).all() and np.isnan(got[1, 5:]).all() and np.isnan(got[1, :, 6:]).all()
  d = np.array([0.0, 1.0, 2.0, 2.2, 4.0, 4.1, 8.0, 9.0, 16.0, 16.5, np.inf, np.nan])
  np.testing.assert_array_equal(pd.distance_bins(d), [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1])


def test_change_counts_match_brute_force():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(3, 6, 5))
  before, after = rng.integers(0, 4, size=labels.shape), rng.integers(0, 4, size=labels.shape)
  valid = rng.random(labels.shape) < 0.8
  bins = rng.integers(0, 5, size=labels.shape)
  got = pd.change_counts(before, after, labels, valid, bins, 4)
  wr, rw = np.zeros(4, int), np.zeros(4, int)
  wr_b, rw_b = np.zeros(5, int), np.zeros(5, int)
  changed = 0
  for idx in np.ndindex(labels.shape):
    if not valid[idx]:
      continue
    y = labels[idx]
    changed += before[idx] != after[idx]
    if before[idx] != y and after[idx] == y:
      wr[y] += 1
      wr_b[bins[idx]] += 1
    if before[idx] == y and after[idx] != y:
      rw[y] += 1
      rw_b[bins[idx]] += 1
  assert got["wrong_to_right"] == wr.sum() and got["right_to_wrong"] == rw.sum() and got["changed"] == changed
  assert got["wrong_to_right_by_class"] == wr.tolist() and got["right_to_wrong_by_class"] == rw.tolist()
  assert got["wrong_to_right_by_distance"] == wr_b.tolist() and got["right_to_wrong_by_distance"] == rw_b.tolist()
  assert wr.sum() > 0 and rw.sum() > 0


def test_affinity_counts_and_table_match_brute_force():
  lab, hs, ws = scene()
  bins = pd.distance_bins(pd.boundary_distance(lab, hs, ws))
  rng = np.random.default_rng(1)
  aff = rng.uniform(size=(*lab.shape, 8 * len(RATES))).astype(np.float32)
  got = pd.affinity_counts(aff, lab, bins, RATES, IGN)
  targets, valid = brute_targets(lab, RATES)
  counts = np.zeros((len(RATES), 5, 2, 2), int)
  mass = np.zeros((len(RATES), 5, 2))
  for n, i, j, d in zip(*np.nonzero(valid)):
    if bins[n, i, j] < 0:
      continue
    t = int(targets[n, i, j, d])
    counts[d // 8, bins[n, i, j], t, int(aff[n, i, j, d] > 0.5)] += 1
    mass[d // 8, bins[n, i, j], t] += aff[n, i, j, d]
  np.testing.assert_array_equal(got["counts"], counts)
  np.testing.assert_allclose(got["mass"], mass, rtol=1e-5)
  assert counts[:, :, 0].sum() > 0  # the scene has negative pairs
  table = pd.affinity_table(counts[0], mass[0])
  for k in range(5):
    (tn, fp), (fn, tp) = counts[0, k]
    assert table["accuracy"][k] == (None if counts[0, k].sum() == 0 else pytest.approx((tn + tp) / counts[0, k].sum()))
    assert table["negative_recall"][k] == (None if tn + fp == 0 else pytest.approx(tn / (tn + fp)))
    assert table["negative_precision"][k] == (None if tn + fn == 0 else pytest.approx(tn / (tn + fn)))


def test_neighbour_mass_matches_brute_force():
  lab, _, _ = scene()
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(*lab.shape, 4))
  p = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  aff = rng.uniform(size=(*lab.shape, 8 * len(RATES))).astype(np.float32)
  got = pd.neighbour_mass(p, aff, lab, RATES, IGN)
  offs = brute_offsets(RATES)
  b, h, w = lab.shape
  for n in range(b):
    for i in range(h):
      for j in range(w):
        y = lab[n, i, j] if lab[n, i, j] != IGN else 0
        tot = cross = wrong = 0.0
        for d, (s, t) in enumerate(offs):
          if 0 <= i + s < h and 0 <= j + t < w:
            a = aff[n, i, j, d]
            tot += a
            nl = lab[n, i + s, j + t]
            cross += a * (nl != lab[n, i, j] and nl != IGN)
            wrong += a * (1 - p[n, i + s, j + t, y])
        assert got["neighbour"][n, i, j] == pytest.approx(tot, rel=1e-5)
        assert got["cross"][n, i, j] == pytest.approx(cross, rel=1e-5, abs=1e-6)
        assert got["wrong_vote"][n, i, j] == pytest.approx(wrong, rel=1e-5, abs=1e-6)
  assert got["cross"].max() > 0


def brute_rule(p, a, rates, lam, iterations, rule, tau=0.9):
  p0 = np.array(p, np.float64)
  p = p0.copy()
  a = np.asarray(a, np.float64)
  offs = brute_offsets(rates)
  b, h, w, _ = p.shape
  for _ in range(iterations):
    new = np.zeros_like(p)
    for n in range(b):
      for i in range(h):
        for j in range(w):
          base = p0[n, i, j] if rule == "anchored" else p[n, i, j]
          nb = 0.0
          for d, (s, t) in enumerate(offs):
            if 0 <= i + s < h and 0 <= j + t < w:
              nb = nb + a[n, i, j, d] * p[n, i + s, j + t]
          if rule == "mean":
            nb = nb / len(offs)
          if rule == "affnorm":
            nb = nb / max(a[n, i, j].sum(), 1.0)
          v = lam * base * base.max() + nb
          new[n, i, j] = v / v.sum()
          if rule == "gated" and p0[n, i, j].max() >= tau:
            new[n, i, j] = p0[n, i, j]
    p = new
  return p


@pytest.mark.parametrize("rule", pd.RULES)
def test_update_rules_match_brute_force(rule):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 6, 3)) * 2
  p = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  a = rng.uniform(size=(2, 5, 6, 8 * len(RATES))).astype(np.float32)
  got = pd.propagate_rule(jnp.asarray(p), jnp.asarray(p), jnp.asarray(a), RATES, rule, lam=6.0, tau=0.9, iterations=3)
  want = brute_rule(p, a, RATES, 6.0, 3, rule)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
  if rule == "gated":
    assert (p.max(-1) >= 0.9).any() and (p.max(-1) < 0.9).any()


def test_summary_non_decreasing_flags():
  runs = [
      {"variants": {"rules": {"a": [0.5, 0.6, 0.6], "b": [0.5, 0.6, 0.55]}}},
      {"variants": {"rules": {"a": [0.4, 0.45, 0.5], "b": [0.4, 0.5, 0.6]}}},
  ]
  s = pd.summarize(runs)["rules"]
  assert s["a"]["non_decreasing_all"] and not s["b"]["non_decreasing_all"]
  assert s["a"]["gain_1"] == pytest.approx(0.075) and s["b"]["gain_10"] == pytest.approx(0.125)
  np.testing.assert_allclose(s["a"]["mean"], [0.45, 0.525, 0.55])


def test_cli_on_a_tiny_run_agrees_with_evaluation(data_dir, tmp_path, capsys):
  from dilaff_jax import train

  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir, **{"train.num_steps": 2, "train.eval_at_end": True})
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "eval", "step_2", "results.json")) as f:
    evaluated = json.load(f)
  out = str(tmp_path / "diag")
  assert pd.main([f"--workdir={workdir}", f"--output={out}", "--config.affinity.lam=6.0"]) == 0
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  run = report["runs"][0]
  assert run["step"] == 2 and run["num_images"] == 8
  its = evaluated["sweep"]["iterations"]  # the tiny config sweeps (0, 1, 3)
  for name in ("predicted", "oracle"):
    np.testing.assert_allclose(
        [run["sweep"][name][pd.SWEEP.index(i)] for i in its], evaluated["sweep"][name], atol=1e-6
    )
  assert run["variants"]["rules"]["paper"] == run["sweep"]["predicted"]
  assert sum(run["pixels_by_distance"]) > 0 and len(run["changes"]) == len(pd.SWEEP) - 1
  assert set(report["summary"]) == {"lambda", "mu", "rates", "rules", "rules_oracle"}
  assert os.path.getsize(os.path.join(out, "report.png")) > 0
  assert "## Summary over runs" in open(os.path.join(out, "report.md")).read()
  capsys.readouterr()
  assert pd.main([f"--workdir={tmp_path / 'nothing'}", f"--output={out}"]) == 2
  assert "config.json" in capsys.readouterr().err
