"""The embedded default: `synthetic_shapes` (generated locally, no download), sized for a 2-core CPU.

A small DeepLabv3+ (ResNet-18, narrow heads, random init) trains jointly with dilated affinity for 500 steps and is
scored with the propagation sweep on the first 250 test scenes, in about 11 minutes on 2 CPU cores:

  python -m dilaff_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m dilaff_jax.main --config=configs/synthetic.py:baseline --workdir=runs/synthetic_baseline
  python -m dilaff_jax.main --config=configs/synthetic.py:aaf --workdir=runs/synthetic_aaf            # Table 5
  python -m dilaff_jax.main --config=configs/synthetic.py:boundary --workdir=runs/synthetic_boundary  # Table 5
  python -m dilaff_jax.main --config=configs/synthetic.py:tiny --workdir=runs/tiny # seconds; used by tests

Geometry: the paper's at half scale (docs/geometry.md). Scenes of 176-256 px (VOC's ~375-500 halved), crop 257
(513 halved) and the paper's R = {8, (12, 24), 16} halved, {4, (6, 12), 8}: every rate stands to the objects, the
image and the crop as the paper's do, within 1.1x. Every rate must exceed 2, the width of the void band along
boundaries: a pair at distance <= 2 that straddles a boundary always touches the band, so it is never a valid
negative and that rate would learn nothing.

Splits: `train` to learn, `tune` to choose loss weights and propagation settings (launch/study.sh, stage tune),
`test` (1000 scenes) for every reported number.

Named variants (``--config=configs/synthetic.py:NAME``), the paper's ablations at this scale (launch/study.sh runs
them over seeds):
  baseline:                   plain DeepLabv3+ (no affinity), the paper's baseline
  Table 1 (R = {4, 8, 16, 32}, the paper's {8, 16, 32, 64} halved): table1_none, table1_signal, table1_neighbor,
                              table1_sqrt
  Table 2 (sqrt weights, the paper's rate sets halved): table2_r4_8, table2_r4_8_16, table2_r4_8_16_32,
                              table2_r4_6x12_8 (= the default), table2_r4_6x12_8_16x32_24
  Table 5: aaf, boundary
Loss weights (β, AAF's weight, boundary's w0) and propagation's λ, reading and iteration count are the values the
tune stage chose on the tune split, with the same budget for every method (`STAGE=choose bash launch/study.sh` wrote
the choices and their evidence to results/study_synthetic/tuning.md and .json); the test stage refuses to start while
this file differs from them (`python -m dilaff_jax.research.tuning --check=results/study_synthetic/tuning.json`).
"""

from configs import default, variants

R_4_8_16_32 = (4, 8, 16, 32)

# name -> {dotted config key: value}; adding a variant is one line.
VARIANTS = {
    "baseline": variants.BASELINE,
    # Table 1's rows with the β each chose on the tune split (results/study_synthetic/tuning.md)
    "table1_none": variants.affinity_row(R_4_8_16_32, "none", 0.3),
    "table1_signal": variants.affinity_row(R_4_8_16_32, "signal", 0.1),
    "table1_neighbor": variants.affinity_row(R_4_8_16_32, "neighbor", 0.1),
    "table1_sqrt": variants.affinity_row(R_4_8_16_32, "sqrt", 0.1),
    "table2_r4_8": {"affinity.rates": (4, 8)},
    "table2_r4_8_16": {"affinity.rates": (4, 8, 16)},
    "table2_r4_8_16_32": {"affinity.rates": R_4_8_16_32},
    "table2_r4_6x12_8": {"affinity.rates": (4, (6, 12), 8)},
    "table2_r4_6x12_8_16x32_24": {"affinity.rates": (4, (6, 12), 8, (16, 32), 24)},
    **variants.STRUCTURE,
}


def get_config(variant: str = ""):
  c = default.get_config()
  c.dataset.name = "synthetic_shapes/default"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"  # reported numbers; loss weights and propagation settings are chosen on "tune"
  c.dataset.num_classes = 6
  c.dataset.crop_size = 257  # the paper's 513 halved, as the scenes (176-256 px) are VOC's (~375-500 px) halved
  c.dataset.min_scale = 0.75
  c.dataset.max_scale = 1.5
  c.dataset.eval_pad_size = (257, 257)

  c.model.depth = 18
  c.model.pretrained = "none"  # random init: the demo trains from scratch
  c.model.multi_grid = (1, 2)  # one rate per unit of ResNet-18's last stage
  c.model.aspp_channels = 64
  c.model.low_level_channels = 24
  c.model.decoder_channels = 64
  c.model.dropout_rate = 0.0
  c.model.bn_momentum = 0.9  # short runs: running statistics must follow quickly

  c.affinity.rates = (4, (6, 12), 8)
  # Chosen on the tune split (results/study_synthetic/tuning.md: 3 values of each weight, seeds 100 and 101, the
  # highest mean mIoU): β = 0.1 (the smallest value tried; 0.3 and 1 score 6 and 29 points lower), then propagation
  # on that row: the paper's reading of Eq. 6 with λ = 3 and 1 iteration (λ = 6 and 12 within 0.1 point at 1).
  c.affinity.beta = 0.1
  c.affinity.lam = 3.0
  c.affinity.propagation_reading = "paper"
  c.affinity.iterations = 1
  # Table 5's methods, tuned the same way: AAF's weight 1 (of 0.3, 1, 3) and boundary reweighting's w0 = 30 (of 3,
  # 10, 30; the largest value tried, all three within 0.7 point).
  c.structure.aaf_weight = 1.0
  c.structure.boundary_w0 = 30.0

  c.train.batch_size = 4
  c.train.num_steps = 500
  c.train.learning_rate = 0.02
  c.train.weight_decay = 1e-4
  c.train.log_every = 25
  c.train.image_summary_every = 200
  c.train.checkpoint_every = 200
  c.train.eval_every = 100  # a validation curve: 5 points on the first 50 tune scenes (about 15 s each)
  c.train.eval_max_images = 50
  c.train.validation_split = "tune"  # the test scenes are for reported numbers only
  c.eval.batch_size = 10
  c.eval.max_images = 250  # the first 250 of the 1000 test scenes (a few minutes); the study scores all of them

  if variant == "tiny":
    c.dataset.name = "synthetic_shapes/tiny"
    c.dataset.crop_size = 33
    c.dataset.eval_pad_size = (65, 65)
    c.model.aspp_channels = 16
    c.model.low_level_channels = 8
    c.model.decoder_channels = 16
    c.train.batch_size = 4
    c.train.num_steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.image_summary_every = 2
    c.eval.batch_size = 4
    c.eval.iterations = (0, 1, 3)
    c.affinity.iterations = 3
    return c
  return variants.apply(c, variant, VARIANTS, also=("tiny",))
