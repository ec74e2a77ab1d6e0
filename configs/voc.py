"""PASCAL VOC 2012 + SBD (10,582 train_aug / 1,449 val), the paper's §4.1 setting and its ablations.

  python -m dilaff_jax.main --config=configs/voc.py --workdir=DIR           # §4.3 best: R={8,(12,24),16}, β=1.2
  python -m dilaff_jax.main --config=configs/voc.py:table1_sqrt --workdir=DIR

Named variants (``--config=configs/voc.py:NAME``) reproduce one row each:
  Table 1 (R = {8, 16, 32, 64}): table1_baseline, table1_signal, table1_neighbor, table1_sqrt
  Table 2 (sqrt weights):        table2_r8_16, table2_r8_16_32, table2_r8_16_32_64, table2_r8_12x24_16,
                                 table2_r8_12x24_16_32x64_48
  Tables 3–4 (propagation):      table3 (= table2_r8_16), table4 (= table2_r8_12x24_16); the evaluation prints the
                                 sweep over iterations with predicted and ground-truth affinity
  Table 5:                       baseline (plain DeepLabv3+), aaf (+ adaptive affinity fields), boundary
                                 (+ U-Net's boundary weight map), paper (= table4); + CRF: `--config.eval.crf=True`
"""

from configs import default, variants

R_8_16_32_64 = (8, 16, 32, 64)
_row = variants.affinity_row

# name -> config keys; Tables 1 and 2 give each row's rates, scheme and β
VARIANTS = {
    "baseline": variants.BASELINE,
    "table1_baseline": _row(R_8_16_32_64, "none", 1.1),
    "table1_signal": _row(R_8_16_32_64, "signal", 1.3),
    "table1_neighbor": _row(R_8_16_32_64, "neighbor", 0.25),
    "table1_sqrt": _row(R_8_16_32_64, "sqrt", 1.5),
    "table2_r8_16": _row((8, 16), "sqrt", 1.5),
    "table2_r8_16_32": _row((8, 16, 32), "sqrt", 1.2),
    "table2_r8_16_32_64": _row(R_8_16_32_64, "sqrt", 1.6),
    "table2_r8_12x24_16": _row((8, (12, 24), 16), "sqrt", 1.2),
    "table2_r8_12x24_16_32x64_48": _row((8, (12, 24), 16, (32, 64), 48), "sqrt", 0.9),
}
VARIANTS["table3"] = VARIANTS["table2_r8_16"]
VARIANTS["table4"] = VARIANTS["table2_r8_12x24_16"]
VARIANTS["paper"] = VARIANTS["table4"]
VARIANTS.update(variants.STRUCTURE)  # Table 5: plain DeepLabv3+ trained with AAF or U-Net's boundary weights


def get_config(variant: str = ""):
  c = default.get_config()
  c.dataset.name = "voc2012_aug"
  c.dataset.train_split = "train_aug"
  c.dataset.eval_split = "val"
  c.dataset.num_classes = 21
  c.dataset.crop_size = 513
  c.dataset.eval_pad_size = (513, 513)
  c.train.batch_size = 16
  c.train.num_steps = 30_000
  c.train.learning_rate = 0.007
  return variants.apply(c, variant, VARIANTS)
