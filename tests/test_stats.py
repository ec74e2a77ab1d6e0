"""n_k statistics (§3.2, Fig. 3): hand counts, streaming, padding invariance, JSON round trip."""

import json

import numpy as np
import pytest

from dilaff_jax import stats as stats_lib
from dilaff_jax.stats import AffinityStats
from test_affinity import IGN, brute_categories, brute_targets, random_labels

HAND_MAP = np.array([[0, 0, 1], [0, 0, 1], [0, 0, IGN]], np.uint8)


def test_hand_counted_shares():
  # per pixel (k, valid, positive) at rate 1, counted by hand (see test_affinity's hand case):
  # k = 3,3,1,5,5,1,3,3 for the 8 labelled pixels; 34 valid signals of which 24 positive.
  s = stats_lib.compute_stats([HAND_MAP], [1])
  np.testing.assert_allclose(s.freq[0], [0, 2 / 8, 0, 4 / 8, 0, 2 / 8, 0, 0, 0])
  np.testing.assert_allclose(s.pos_freq, [24 / 34])
  assert s.counts.images == 1 and s.counts.category.sum() == 8
  # a rate larger than the map: every labelled pixel is n_0 and there are no valid signals
  with pytest.raises(ValueError, match="no labelled pixels / valid signals"):
    stats_lib.compute_stats([HAND_MAP], [5])


def test_streaming_matches_brute_force_over_maps_of_different_sizes():
  rates = ((1, 2), (2, 1), (3, 3))
  maps = [random_labels(s, shape=(1, 5 + s, 7 - s))[0] for s in range(4)]
  s = stats_lib.compute_stats(iter(maps), rates)
  cat = np.zeros((3, 9))
  pos = np.zeros(3)
  val = np.zeros(3)
  for m in maps:
    k = brute_categories(m[None], rates)[0]
    t, v = brute_targets(m[None], rates)
    for r in range(3):
      for kk in k[..., r][m != IGN]:
        cat[r, kk] += 1
      pos[r] += t[0][..., 8 * r:8 * r + 8].sum()
      val[r] += v[0][..., 8 * r:8 * r + 8].sum()
  np.testing.assert_array_equal(s.counts.category, cat)
  np.testing.assert_array_equal(s.counts.positive, pos)
  np.testing.assert_array_equal(s.counts.valid, val)
  np.testing.assert_allclose(s.freq, cat / cat.sum(1, keepdims=True))
  np.testing.assert_allclose(s.pos_freq, pos / val)
  # padding with the ignore label (used to bound recompiles) changes nothing
  s1 = stats_lib.compute_stats(iter(maps), rates, pad_multiple=1)
  np.testing.assert_array_equal(s1.counts.category, s.counts.category)
  np.testing.assert_array_equal(s1.counts.valid, s.counts.valid)
  # counts merge exactly: the sum of per-map counts equals the streamed total
  total = sum((stats_lib.map_counts(m, rates) for m in maps), stats_lib.StatsCounts.zeros(3))
  np.testing.assert_array_equal(total.category, s.counts.category)
  assert total.images == 4


def test_json_round_trip_and_select(tmp_path):
  s = stats_lib.compute_stats([HAND_MAP, HAND_MAP.T], [(1, 1), (1, 2)], source="hand")
  path = tmp_path / "sub" / "stats.json"
  s.save(str(path))
  back = AffinityStats.load(str(path))
  assert back.rates == s.rates and back.source == "hand"
  np.testing.assert_array_equal(back.freq, s.freq)
  np.testing.assert_array_equal(back.pos_freq, s.pos_freq)
  np.testing.assert_array_equal(back.counts.category, s.counts.category)
  sel = back.select([(1, 2)])
  np.testing.assert_array_equal(sel.freq[0], s.freq[1])
  with pytest.raises(ValueError, match="not in the statistics"):
    back.select([(3, 3)])
  data = json.loads(path.read_text())
  assert data["rates"] == [[1, 1], [1, 2]]


def test_load_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    AffinityStats.load(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    AffinityStats.load(str(bad))
  with pytest.raises(ValueError, match="expected \\(1, 9\\)"):
    AffinityStats([(1, 1)], np.ones((1, 8)) / 8, [0.5])


def test_plot_writes_png(tmp_path):
  s = stats_lib.compute_stats([random_labels(0, shape=(1, 20, 20))[0]], [1, 2, 3])
  out = tmp_path / "fig3.png"
  stats_lib.plot_category_shares(s, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_on_a_prepared_dataset(tmp_path, capsys):
  from dilaff_jax import datasets
  data_dir = str(tmp_path / "tfds")
  builder = datasets.get_builder("synthetic_shapes/tiny", data_dir=data_dir)
  out, png = tmp_path / "s.json", tmp_path / "fig3.png"
  stats_lib.main(["--dataset=synthetic_shapes/tiny", "--split=train", f"--data_dir={data_dir}", "--rates=2,3x6",
                  "--plot_rates=1,2,4", f"--output={out}", f"--plot={png}"])
  s = AffinityStats.load(str(out))
  assert s.rates == ((2, 2), (3, 6), (6, 3)) and s.source == "synthetic_shapes/tiny:train"
  # the same numbers as streaming the decoded label maps by hand
  labels = [ex["label"][..., 0] for ex in builder.as_dataset(split="train").as_numpy_iterator()]
  direct = stats_lib.compute_stats(labels, s.rates)
  np.testing.assert_array_equal(s.counts.category, direct.counts.category)
  assert s.counts.images == 24
  assert png.read_bytes()[:4] == b"\x89PNG"
  assert "rate      2: pi=" in capsys.readouterr().out
