"""n_k statistics (§3.2, Fig. 3): hand counts, streaming, padding invariance, JSON round trip."""

import json

import numpy as np
import pytest

from dilaff_jax.method import neighbour_stats as stats_lib
from dilaff_jax.research import stats as stats_cli
from dilaff_jax.method.neighbour_stats import AffinityStats
from test_affinity import IGN, brute_categories, brute_targets, random_labels

HAND_MAP = np.array([[0, 0, 1], [0, 0, 1], [0, 0, IGN]], np.uint8)


@pytest.mark.parametrize("rule", ["count", "rescale"])
def test_hand_counted_shares(rule):
  # per pixel (k, valid, positive) at rate 1, counted by hand (see test_affinity's hand case): 34 valid signals of
  # which 24 positive; "count": k = 3,3,1,5,5,1,3,3 for the 8 labelled pixels; "rescale" (round(8q/v)):
  # k = 8,5,3,8,6,2,8,6.
  s = stats_lib.compute_stats([HAND_MAP], [1], partial_neighbors=rule)
  want = {"count": [0, 2, 0, 4, 0, 2, 0, 0, 0], "rescale": [0, 0, 1, 1, 0, 1, 2, 0, 3]}[rule]
  np.testing.assert_allclose(s.freq[0], np.array(want) / 8)
  np.testing.assert_allclose(s.pos_freq, [24 / 34])
  assert s.counts.images == 1 and s.counts.category.sum() == 8 and s.partial_neighbors == rule
  # a rate larger than the map: no pixel has a valid neighbour, so no pixel has a category
  with pytest.raises(ValueError, match="too small for these rates"):
    stats_lib.compute_stats([HAND_MAP], [5], partial_neighbors=rule)


def test_border_band_of_uniform_images_is_not_boundary():
  # Uniform 40x60 label maps: under "rescale" every pixel is n_8 at every rate; under "count" the border band
  # (a quarter of the pixels at rate 4 here) lands in n_3 / n_5 and would get boundary-level weights.
  maps = [np.full((40, 60), c, np.uint8) for c in range(3)]
  rescale = stats_lib.compute_stats(maps, [4, 8])
  np.testing.assert_array_equal(rescale.freq[:, 8], [1.0, 1.0])
  count = stats_lib.compute_stats(maps, [4, 8], partial_neighbors="count")
  border = 1 - (40 - 8) * (60 - 8) / (40 * 60)
  np.testing.assert_allclose(count.freq[0, 8], 1 - border)
  np.testing.assert_allclose(count.freq[0, 3] + count.freq[0, 5], border)


@pytest.mark.parametrize("rule", ["rescale", "count"])
def test_streaming_matches_brute_force_over_maps_of_different_sizes(rule):
  rates = ((1, 2), (2, 1), (3, 3))
  maps = [random_labels(s, shape=(1, 5 + s, 7 - s))[0] for s in range(4)]
  s = stats_lib.compute_stats(iter(maps), rates, partial_neighbors=rule)
  cat = np.zeros((3, 9))
  pos = np.zeros(3)
  val = np.zeros(3)
  for m in maps:
    k = brute_categories(m[None], rates, rule)[0]
    t, v = brute_targets(m[None], rates)
    for r in range(3):
      for kk in k[..., r][m != IGN]:
        if kk >= 0:  # a pixel without a valid neighbour at this rate has no category
          cat[r, kk] += 1
      pos[r] += t[0][..., 8 * r : 8 * r + 8].sum()
      val[r] += v[0][..., 8 * r : 8 * r + 8].sum()
  np.testing.assert_array_equal(s.counts.category, cat)
  np.testing.assert_array_equal(s.counts.positive, pos)
  np.testing.assert_array_equal(s.counts.valid, val)
  np.testing.assert_allclose(s.freq, cat / cat.sum(1, keepdims=True))
  np.testing.assert_allclose(s.pos_freq, pos / val)
  # padding with the ignore label (used to bound recompiles) changes nothing
  s1 = stats_lib.compute_stats(iter(maps), rates, pad_multiple=1, partial_neighbors=rule)
  np.testing.assert_array_equal(s1.counts.category, s.counts.category)
  np.testing.assert_array_equal(s1.counts.valid, s.counts.valid)
  # counts merge exactly: the sum of per-map counts equals the streamed total
  total = sum((stats_lib.map_counts(m, rates, partial_neighbors=rule) for m in maps), stats_lib.StatsCounts.zeros(3))
  np.testing.assert_array_equal(total.category, s.counts.category)
  assert total.images == 4


def test_json_round_trip_and_select(tmp_path):
  s = stats_lib.compute_stats([HAND_MAP, HAND_MAP.T], [(1, 1), (2, 3)], source="hand", partial_neighbors="count")
  path = tmp_path / "sub" / "stats.json"
  s.save(str(path))
  back = AffinityStats.load(str(path))
  assert back.rates == s.rates and back.source == "hand" and back.partial_neighbors == "count"
  np.testing.assert_array_equal(back.freq, s.freq)
  np.testing.assert_array_equal(back.pos_freq, s.pos_freq)
  np.testing.assert_array_equal(back.counts.category, s.counts.category)
  sel = back.select([(2, 3)])
  np.testing.assert_array_equal(sel.freq[0], s.freq[1])
  with pytest.raises(ValueError, match="not in the statistics"):
    back.select([(3, 3)])
  data = json.loads(path.read_text())
  assert data["rates"] == [[1, 1], [2, 3]] and data["partial_neighbors"] == "count"
  # a file of the first format (no rule recorded, void-neighbour pixels in n_0) is refused with what to do
  data["format_version"] = 1
  del data["partial_neighbors"]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="recompute the statistics"):
    AffinityStats.load(str(path))


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
  stats_cli.plot_category_shares(s, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_on_a_prepared_dataset(tmp_path, capsys):
  from dilaff_jax import datasets

  data_dir = str(tmp_path / "tfds")
  builder = datasets.get_builder("synthetic_shapes/tiny", data_dir=data_dir)
  out, png = tmp_path / "s.json", tmp_path / "fig3.png"
  stats_cli.main(
      [
          "--dataset=synthetic_shapes/tiny",
          "--split=train",
          f"--data_dir={data_dir}",
          "--rates=2,3x6",
          "--plot_rates=1,2,4",
          f"--output={out}",
          f"--plot={png}",
      ]
  )
  s = AffinityStats.load(str(out))
  assert s.rates == ((2, 2), (3, 6), (6, 3)) and s.source == "synthetic_shapes/tiny:train"
  # the same numbers as streaming the decoded label maps by hand
  labels = [ex["label"][..., 0] for ex in builder.as_dataset(split="train").as_numpy_iterator()]
  direct = stats_lib.compute_stats(labels, s.rates)
  np.testing.assert_array_equal(s.counts.category, direct.counts.category)
  assert s.counts.images == 24
  assert png.read_bytes()[:4] == b"\x89PNG"
  assert "rate      2: pi=" in capsys.readouterr().out
