"""``python -m dilaff_jax.export --format=savedmodel``: the evaluation model as a TensorFlow SavedModel that plain
TensorFlow (without the project) reloads and runs at any batch size, giving predict's masks; ``--format=tflite`` is
refused with its reason."""

import json
import os
import textwrap

import jax
import numpy as np
import pytest

from dilaff_jax import export, predict
from dilaff_jax.datasets import shapes_render
from dilaff_jax.engine import checkpoints, run_spec
from dilaff_jax.engine import train_state as state_lib
from cli_helpers import run_outside_the_project
from test_image_folder import scramble_heads
from test_train import tiny_config

SIZE = (48, 53)  # not aligned to the output stride: padding and cropping inside the model


@pytest.fixture(scope="module")
def demo_run(data_dir, tmp_path_factory):
  """A workdir of the tiny demo config whose checkpoint 2 has random heads centred on its features (so that masks
  hold several classes); (workdir, config, variables, images [3, 48, 53, 3])."""
  config = tiny_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("demo_run"))
  spec = run_spec.derive(config)
  state = state_lib.create_train_state(spec, state_lib.build_model(spec), jax.random.key(0))
  with checkpoints.opened(workdir, config, write=True) as mngr:
    checkpoints.save_checkpoint(mngr, state, {"compat": checkpoints.compat_record(spec), "step": 0})
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  rng = np.random.default_rng(3)
  images = np.stack(
      [shapes_render.render_scene(rng, height=SIZE[0], width=SIZE[1], max_objects=3)[0] for _ in range(3)]
  )
  variables = scramble_heads(workdir, config, images[0], step=2)
  return workdir, config, variables, images


RELOAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    images = np.load(sys.argv[2])
    out = model.serve(tf.constant(images))                      # batch 3
    one = model.signatures["serving_default"](images=tf.constant(images[1:2]))   # batch 1, the signature
    np.save(sys.argv[3], out["mask"].numpy())
    np.save(sys.argv[4], out["probabilities"].numpy())
    np.save(sys.argv[5], one["mask"].numpy())
    print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("dilaff"))}))
""")


def test_savedmodel_reloaded_by_plain_tensorflow_gives_predicts_masks(demo_run, tmp_path, capsys):
  workdir, config, variables, images = demo_run
  output = str(tmp_path / "model.savedmodel")
  argv = [f"--workdir={workdir}", f"--output={output}", f"--size={SIZE[0]},{SIZE[1]}", "--format=savedmodel"]
  assert export.main(argv) == 0
  assert "(savedmodel," in capsys.readouterr().out
  info = json.load(open(output + ".json"))
  assert info["format"] == f"{export.FORMAT}+savedmodel" and info["size"] == list(SIZE)
  assert info["source_checkpoint"]["step"] == 2 and info["platforms"] == ["cpu"]
  assert os.path.isfile(os.path.join(output, "saved_model.pb"))
  np.save(tmp_path / "images.npy", images)
  outs = [str(tmp_path / f"{name}.npy") for name in ("mask", "probs", "mask1")]
  run_outside_the_project(RELOAD, output, str(tmp_path / "images.npy"), *outs, cwd=str(tmp_path))  # plain TF
  masks, probs, mask1 = (np.load(p) for p in outs)
  assert masks.dtype == np.int32 and masks.shape == (3, *SIZE) and probs.shape == (3, *SIZE, 6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
  np.testing.assert_array_equal(mask1[0], masks[1])  # another batch size, the same image: the same mask
  predict_one = predict.make_predictor(run_spec.derive(config), variables)
  equal = 0
  for image, mask in zip(images, masks):
    expected = predict_one(image).refined
    assert len(np.unique(expected)) > 1  # scrambled heads: not one class everywhere
    equal += int(np.sum(mask == expected))
  assert equal / masks.size >= 0.999, equal / masks.size

  assert export.main(argv) == 0  # a second export replaces the SavedModel
  capsys.readouterr()
  (tmp_path / "file").write_text("x")
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "notes.txt").write_text("mine")
  cases = [
      (["--format=tflite"], "TFLite converter cannot convert this model"),
      ([f"--output={tmp_path / 'file'}"], "is a file"),
      ([f"--output={tmp_path / 'folder'}"], "holds something else than a SavedModel"),
  ]
  for extra, expected in cases:
    assert export.main(argv + extra) == 2, extra
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], (extra, err)
  assert (tmp_path / "folder" / "notes.txt").read_text() == "mine"
