"""Every configuration key with its default and meaning. Other configs start from this one.

Values follow the paper (§4.1) and DeepLabv3+ where the paper defers to it. Override any key on the command line,
e.g. ``--config.affinity.beta=1.5``. ``dilaff_jax.engine.config_checks.validate`` checks the result at start-up.
"""

import ml_collections

from dilaff_jax.method import conventions


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- data (dilaff_jax/datasets/input_pipeline.py) ---
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "voc2012_aug"  # TFDS name (the project's builders register on import)
  # TFDS data_dir (None: ~/tensorflow_datasets)
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.manual_dir = ml_collections.FieldReference(None, field_type=str)  # where the downloaded archives are
  c.dataset.train_split = "train_aug"
  c.dataset.eval_split = "val"
  c.dataset.num_classes = 21
  # image_folder only: masks of two classes saved as 0/255 (255 is void otherwise): 255 becomes class 1
  c.dataset.foreground_255 = False
  c.dataset.ignore_label = conventions.IGNORE_LABEL
  c.dataset.crop_size = 513  # training crop (square)
  c.dataset.min_scale = 0.5  # random scale in [min_scale, max_scale] with step scale_step
  c.dataset.max_scale = 2.0
  c.dataset.scale_step = 0.25
  c.dataset.eval_pad_size = (513, 513)  # evaluation pads every image (image: mean, label: 255) to this size;
  # None: images are grouped by size and padded to the largest of their group (no side beyond sqrt(2) x its own)
  c.dataset.eval_max_size = 2048  # with eval_pad_size None: an image with a longer side is inferred downscaled to
  # it (as predict --max_size; bounds memory) and scored at its full size; 0 = no limit
  c.dataset.mean = conventions.IMAGENET_MEAN_255  # torchvision ImageNet statistics (0-255), matching the weights
  c.dataset.std = conventions.IMAGENET_STD_255

  # --- model (dilaff_jax/models/) ---
  c.model = ml_collections.ConfigDict()
  c.model.depth = 101  # ResNet depth: 18, 34, 50, 101, 152
  c.model.stem = "standard"  # "standard" (7x7) or "deep" (3x3 x3, DeepLab's beta)
  c.model.multi_grid = (1, 2, 4)
  c.model.train_output_stride = 16  # §4.1: 16 to train
  c.model.aspp_channels = 256
  c.model.low_level_channels = 48
  c.model.decoder_channels = 256
  c.model.separable = False
  c.model.dropout_rate = 0.1
  c.model.dtype = "float32"  # compute dtype ("bfloat16" on GPUs); params stay float32
  c.model.bn_momentum = 0.9997  # flax convention; DeepLab's batch_norm_decay
  c.model.bn_epsilon = 1e-5
  # ImageNet weights of the backbone: a torchvision/timm ResNet .safetensors or .pth (`python -m
  # dilaff_jax.models.convert` checks one and makes the .safetensors), or "none" for random init on purpose.
  # ResNet-50 and deeper refuse to start without one of the two (or train.init_from).
  c.model.pretrained = ""

  # --- dilated affinity (§3, dilaff_jax/method/affinity.py) ---
  c.affinity = ml_collections.ConfigDict()
  c.affinity.enabled = True  # False: plain DeepLabv3+, the paper's baseline
  c.affinity.rates = (8, (12, 24), 16)  # R in the paper's shorthand; (12, 24) adds (24, 12)
  c.affinity.beta = 1.2  # β, weight of L_aff (§4.3)
  c.affinity.scheme = "sqrt"  # none | signal | neighbor | sqrt (Table 1)
  c.affinity.gamma = 2.0  # focal loss γ (Eq. 4)
  c.affinity.partial_neighbors = "rescale"  # n_k of pixels with invalid neighbours (border, void): "rescale"
  # k = round(8·q/v) over the v valid ones; "count": k = q (literal §3.2)
  # opt-in cap of every reweighting factor; None: no cap (a category never seen gets the rate's largest weight)
  c.affinity.max_weight = ml_collections.FieldReference(None, field_type=float)
  c.affinity.stats_path = ""  # JSON from `python -m dilaff_jax.research.stats`; "" = <workdir>/affinity_stats.json,
  # computed from the training labels on first start
  c.affinity.stats_max_images = 0  # 0 = the whole training split
  c.affinity.lam = 6.0  # λ of propagation (Eq. 6)
  c.affinity.mu = 7.0  # μ of the steep sigmoid (Eq. 7)
  c.affinity.iterations = 10  # propagation iterations reported as the final result
  # "paper": Eq. 6 as printed (p in both terms); "anchored": the self term stays on the network's prediction p⁰
  c.affinity.propagation_reading = "paper"

  # --- structure losses of Table 5's comparisons (dilaff_jax/method/structure_losses.py) ---
  c.structure = ml_collections.ConfigDict()
  c.structure.kind = "none"  # none | aaf (adaptive affinity fields) | boundary (U-Net weight map)
  c.structure.aaf_weight = 1.0  # weight of the AAF term (the AAF code's λ)
  c.structure.aaf_margin = 3.0  # KL margin m of the separating term
  c.structure.aaf_dilations = (1, 2, 3)  # field dilations on the output grid: 3x3, 5x5, 7x7 fields
  c.structure.aaf_decay = True  # multiply the AAF term by 10^(-step/num_steps), as the AAF code does
  c.structure.boundary_w0 = 10.0  # U-Net's w_0
  c.structure.boundary_sigma = 5.0  # U-Net's σ at its 512-px scale; pixels: sigma * crop_size / 512
  c.structure.boundary_background = 0  # class whose regions are not objects; -1: every class forms objects
  c.structure.boundary_class_balance = True  # w_c: inverse class frequency in the crop (mean 1); False: w_c = 1

  # --- optimisation (DeepLab: SGD momentum, poly schedule) ---
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global batch, split over all devices of all hosts
  c.train.num_steps = 30_000
  c.train.learning_rate = 0.007
  c.train.end_learning_rate = 0.0
  c.train.lr_power = 0.9
  c.train.warmup_steps = 0
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-4  # on conv/dense kernels only
  c.train.log_every = 20  # metrics + progress (steps/s, ETA)
  c.train.image_summary_every = 500  # input / label / prediction / affinity images; 0 = never
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.eval_at_end = True  # evaluate the final checkpoint on dataset.eval_split
  # validation during training: every eval_every steps (0 = never; the paper evaluates at the end), on the first
  # eval_max_images images (0 = eval.max_images) of validation_split ("" = dataset.eval_split; a split apart from
  # the one results are reported on, where the dataset has one); scalars under validation/ in TensorBoard, and the
  # best validated checkpoint is kept beside the newest ones (its step and score in <workdir>/best.json)
  c.train.eval_every = 0
  c.train.eval_max_images = 0
  c.train.validation_split = ""
  # Start a NEW training from another run's segmentation checkpoint: "WORKDIR" (its newest intact checkpoint) or
  # "WORKDIR:STEP". Parameters and batch statistics are copied; the classifier, and the affinity head when its
  # channel count differs, are re-initialised (with a message saying which); step and optimiser state start afresh.
  # Used only when this workdir has no checkpoint yet (a rerun resumes its own). "" = off.
  c.train.init_from = ""

  # --- evaluation (dilaff_jax/evaluate.py) ---
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8  # global
  c.eval.output_stride = 8
  c.eval.scales = (1.0,)  # multi-scale: e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.eval.flip = False
  c.eval.iterations = (0, 1, 3, 6, 10)  # propagation sweep (Tables 3–4)
  c.eval.ground_truth_oracle = True  # also the sweep with ground-truth affinity
  c.eval.max_images = 0  # the first N images, in whole batches of eval.batch_size (0 = the whole split)
  c.eval.output_dir = ""  # results go to <output_dir>/step_<N>/; "" = <workdir>/eval
  c.eval.crf = False  # also score dense-CRF post-processing (Table 5; pydensecrf2), slow
  c.eval.crf_iterations = 10  # mean-field iterations; kernels: Krähenbühl & Koltun's defaults
  c.eval.crf_sxy_gaussian = 3.0
  c.eval.crf_compat_gaussian = 3.0
  c.eval.crf_sxy_bilateral = 80.0
  c.eval.crf_srgb = 13.0
  c.eval.crf_compat_bilateral = 10.0

  # --- multi-host ---
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # auto: when JAX_COORDINATOR_ADDRESS / SLURM / etc. say so; "yes"; "no"
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c
