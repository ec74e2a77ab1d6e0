"""Your own data: a folder DIR with images/ and masks/ (layout in dilaff_jax/datasets/image_folder.py).

  python -m dilaff_jax.main --config=configs/image_folder.py:small --workdir=runs/mine \\
      --config.dataset.manual_dir=DIR                                 # CPU-sized, random init: minutes on 2 cores
  python -m dilaff_jax.main --config=configs/image_folder.py --workdir=runs/mine \\
      --config.dataset.manual_dir=DIR --config.model.pretrained=resnet101.safetensors   # the paper's setting

Classes: DIR/classes.txt (one name a line) or ``--config.dataset.num_classes=N`` (names ``class_0 ...``);
``num_classes = 0`` means "as many as classes.txt lists". Splits: DIR/splits/{train,val}.txt, or 1 image in 10 to
``val`` by a hash of its name. Evaluation groups the images by size and pads each to the largest of its group
(``eval_pad_size = None``); an image longer than ``dataset.eval_max_size`` (2048) a side is inferred downscaled.
Two classes with 0/255 masks (255 is void otherwise): ``--config.dataset.foreground_255=True`` makes 255 class 1.

Default: the paper's VOC setting (§4.1, §4.3 best): ResNet-101 with ImageNet weights, crop 513, batch 16, 30K steps,
R = {8, (12, 24), 16}, β = 1.2, sqrt weights, 10 propagation iterations. Scale ``train.num_steps`` to your data.
``:small``: the embedded demo's model and rates (configs/synthetic.py: ResNet-18, narrow heads, R = {4, (6, 12), 8},
β = 0.1, λ = 3, 1 iteration: chosen on the demo's tune split), random init, crop 97, for images of about 100-130 px a
side. ``:baseline``: plain DeepLabv3+.
"""

import ml_collections

from configs import default, synthetic, variants


def get_config(variant: str = ""):
  if variant in ("small", "small_baseline"):
    c = synthetic.get_config()  # the demo's model size, rates, β and iterations
    c.model.pretrained = "none"  # random init on purpose
    # sized for images of about 100-130 px (the demo's scenes are twice that): crop 97, batch 8, 600 steps
    c.dataset.crop_size = 97
    c.train.batch_size = 8
    c.train.num_steps = 600
    c.train.eval_every = 150  # a validation curve of 4 points (an image folder has no split apart from val)
    c.train.eval_max_images = 0  # the whole val split
    c.train.validation_split = ""  # dataset.eval_split: "val"
    c.eval.max_images = 0  # the whole val split
  else:
    c = default.get_config()
    c.affinity.rates = (8, (12, 24), 16)
    c.affinity.beta = 1.2
  c.dataset.name = "image_folder"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.dataset.num_classes = 0  # 0: as many as DIR/classes.txt lists
  del c.dataset["eval_pad_size"]  # None: grouped by size; a typed None keeps it overridable
  c.dataset.eval_pad_size = ml_collections.FieldReference(None, field_type=tuple)
  if variant in ("small", "small_baseline"):
    return variants.apply(c, "baseline" if variant == "small_baseline" else "", {"baseline": variants.BASELINE})
  return variants.apply(c, variant, {"baseline": variants.BASELINE}, also=("small", "small_baseline"))
