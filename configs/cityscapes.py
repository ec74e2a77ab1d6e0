"""Cityscapes fine (2,975 train / 500 val, 19 classes), §4.4: the best VOC setting transferred.

python -m dilaff_jax.main --config=configs/cityscapes.py --workdir=DIR            # Table 6, dilated affinity
python -m dilaff_jax.main --config=configs/cityscapes.py:baseline --workdir=DIR   # Table 6, DeepLabv3+
"""

from configs import default, variants, voc


def get_config(variant: str = ""):
  c = default.get_config()
  c.dataset.name = "cityscapes19"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.num_classes = 19
  c.dataset.crop_size = 769
  c.dataset.eval_pad_size = (1025, 2049)
  c.train.batch_size = 12
  c.train.num_steps = 90_000
  c.train.learning_rate = 0.01
  c.eval.batch_size = 4
  c.affinity.rates = (8, (12, 24), 16)
  c.affinity.beta = 1.2
  return variants.apply(c, variant, {"baseline": variants.BASELINE, "paper": voc.VARIANTS["paper"]})
