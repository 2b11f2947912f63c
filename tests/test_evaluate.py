"""Evaluation end to end: a tiny model trained here, a Kaggle-layout zip, the evaluate and score
CLIs, native-size inference strategies, and bad inputs."""

import csv
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from unetpp_jax import train
from unetpp_jax.label_scheme import LabelScheme
from unetpp_jax.evaluation import evaluate
from unetpp_jax.evaluation import instances
from unetpp_jax.evaluation import official_metric
from unetpp_jax.evaluation import rle
from unetpp_jax.data import contract, splits
from unetpp_jax.data.builders import synthetic_nuclei

import synthetic_release
import test_main  # Which library lines no command may print.

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
VAL_FRACTION = 0.05  # 12 of the 240 synthetic examples: a quick --split=validation.


def _tiny_config(tfds_dir):
  config = synthetic.get_config()
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.val_fraction = VAL_FRACTION
  # As older runs, which recorded no validation_ids.json: evaluation finds their tail split.
  config.data.split = 'tail'
  config.data.image_size = SIZE
  config.model.filters = (8, 16, 32)  # L = 2.
  config.loss.deep_supervision_heads = (1, 2)
  config.predict.head = 2
  config.optimizer.learning_rate = 1e-2
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 40
  config.log_every_steps = 40
  return config


def _resized(index):
  example = synthetic_nuclei.generate_example(index)
  image = Image.fromarray(example['image']).resize((SIZE, SIZE), Image.BILINEAR)
  label = Image.fromarray(example['label']).resize((SIZE, SIZE), Image.NEAREST)
  return np.asarray(image, np.float32) / 255, np.asarray(label, np.int32)


def _input_fn(config, start_step):
  """In-memory synthetic batches (any source of numpy batches will do for train_and_evaluate)."""
  del start_step
  images, labels = map(np.stack, zip(*[_resized(i) for i in range(16)]))
  devices = 2  # tests/conftest.py: two CPU devices.
  shape = lambda x: x.reshape(devices, -1, *x.shape[1:])

  def batches():
    rng = np.random.default_rng(0)
    while True:
      index = rng.choice(len(images), config.batch_size, replace=False)
      yield {'image': shape(images[index]), 'label': shape(labels[index])}
  eval_batch = {'image': shape(images[:8]), 'label': shape(labels[:8]),
                'weight': np.ones((devices, 4), np.float32)}
  return types.SimpleNamespace(train_iter=batches(), eval_batches=[eval_batch])


def _write_solution(path, indices):
  rows = []
  for index in indices:
    example = synthetic_nuclei.generate_example(index)
    h, w = example['label'].shape
    rows += [(i, e, h, w, 'Public') for i, e in rle.submission_rows(example['id'],
                                                                     example['label'])]
  rle.write_csv(path, rows, header=('ImageId', 'EncodedPixels', 'Height', 'Width', 'Usage'))
  return path


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A trained tiny workdir, the validation ids of its config, and a zip holding them plus two
  training images (which --split=validation must leave out); one image has no masks."""
  root = tmp_path_factory.mktemp('evaluate')
  config = _tiny_config(root / 'tfds')
  train.train_and_evaluate(config, root / 'work', input_fn=_input_fn)
  val_ids = evaluate.split_ids(config, 'validation')
  assert len(val_ids) == 12
  val_indices = sorted(int(i.rsplit('_', 1)[1]) for i in val_ids)
  train_indices = [i for i in range(240) if i not in val_indices][:2]
  data = synthetic_release.write_zip(root / 'stage1_train.zip', val_indices + train_indices,
                           without_masks=val_indices[:1])
  return types.SimpleNamespace(root=root, workdir=root / 'work', data=data, config=config,
                               val_ids=sorted(val_ids), val_indices=val_indices,
                               train_indices=train_indices)


def _run(module, *args, timeout=300):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', f'unetpp_jax.{module}', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _leftovers(directory):
  return [p.name for p in pathlib.Path(directory).iterdir() if '.incomplete-' in p.name
          or '.old-' in p.name]


def test_cli_evaluates_validation_split_and_score_cli_agrees(setup, tmp_path):
  out = tmp_path / 'eval'
  result = _run('evaluate', f'--workdir={setup.workdir}', f'--data={setup.data}',
                f'--output={out}', '--split=validation', '--flips', '--num_overlays=3')
  assert result.returncode == 0, result.stderr[-3000:]
  for noise in test_main._NOISE:  # pylint: disable=protected-access
    assert noise not in result.stderr, noise  # As quiet as training.
  umask = os.umask(0)
  os.umask(umask)
  assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # As mkdir makes it, not mkdtemp's 0700.
  metrics = json.loads((out / 'metrics.json').read_text())
  assert metrics['num_images'] == 12 and metrics['checkpoint_step'] == 40
  assert metrics['weights'] == 'trained'  # The run kept no moving average.
  assert metrics['final_prediction'] == 'accurate'
  assert metrics['inference']['strategy'] == 'resize'  # 'auto', as trained on resized images.
  assert sorted(metrics['predictions']) == ['accurate', 'head1', 'head2']
  for values in metrics['predictions'].values():
    assert len(values['ap_per_threshold']) == 10
    for key in ('iou', 'dice', 'iou_per_image', 'dice_per_image', 'score', 'ap50', 'f1_50'):
      assert 0 <= values[key] <= 1, key
  final = metrics['predictions']['accurate']
  assert final['iou'] > 0.4 and final['dice'] > 0.55  # Trained: far above empty predictions.
  assert final['score'] > 0.05 and final['ap50'] >= final['score']
  assert metrics['score'] == final['score']

  with open(out / 'per_image.csv') as f:
    per_image = list(csv.DictReader(f))
  assert sorted(r['id'] for r in per_image) == setup.val_ids
  assert np.mean([float(r['score']) for r in per_image]) == pytest.approx(final['score'],
                                                                          abs=1e-5)
  no_masks = f'synthetic_0_{setup.val_indices[0]:05d}'
  assert next(r for r in per_image if r['id'] == no_masks)['num_true'] == '0'
  # Per kind of image: a partition of the images, each scored as the mean of its images.
  per_kind = metrics['per_kind']
  assert set(per_kind) <= set(splits.KINDS) and set(per_kind) == {r['kind'] for r in per_image}
  assert sum(v['num_images'] for v in per_kind.values()) == 12
  for kind, values in per_kind.items():
    scores = [float(r['score']) for r in per_image if r['kind'] == kind]
    assert values['num_images'] == len(scores)
    assert values['score'] == pytest.approx(np.mean(scores), abs=1e-5)
  assert set(json.loads(result.stdout)['per_kind']) == set(per_kind)  # The printed summary.
  assert len(list((out / 'overlays').glob('*.png'))) == 3
  assert list(out.glob('events.out.tfevents.*'))
  assert not _leftovers(tmp_path)

  # The submission, scored against a solution file of the same labels, gives the same score.
  submission = rle.read_csv(out / 'submission.csv', require_shape=False)
  assert sorted(submission) == setup.val_ids
  solution = _write_solution(tmp_path / 'solution.csv', setup.val_indices[1:])
  assert sum(len(r.rles) for r in submission.values()) == final['num_pred']
  scored = _run('score', f'--submission={out / "submission.csv"}', f'--solution={solution}',
                f'--output={tmp_path / "score.json"}')
  # The image without masks is not in this solution: the submission has an extra id.
  assert scored.returncode == 1
  assert f'error: {out / "submission.csv"} has 1 ImageId(s) that are not in {solution}' in (
      scored.stderr)
  assert no_masks in scored.stderr and not (tmp_path / 'score.json').exists()

  h, w = synthetic_nuclei.generate_example(setup.val_indices[0])['label'].shape
  with open(solution, 'a', newline='') as f:  # An image without nuclei: one empty row.
    csv.writer(f).writerow([no_masks, '', h, w, 'Public'])
  scored = _run('score', f'--submission={out / "submission.csv"}', f'--solution={solution}',
                f'--output={tmp_path / "score.json"}')
  assert scored.returncode == 0, scored.stderr[-3000:]
  printed = json.loads(scored.stdout)
  assert printed == json.loads((tmp_path / 'score.json').read_text())
  for key in ('score', 'ap_per_threshold', 'ap50', 'f1_50', 'num_images', 'tp50', 'fp50',
              'fn50'):
    assert printed[key] == pytest.approx(final[key]), key


def test_solution_labels_and_score_match_masks(setup, tmp_path):
  """--solution instead of masks gives the same metrics; the score of submission.csv equals the
  evaluation's own score; a missing image counts as all false negatives."""
  indices = setup.val_indices[1:5]
  data = synthetic_release.write_zip(tmp_path / 'images.zip', indices)
  options = evaluate.InferenceOptions(strategy='resize', flips=False)
  with_masks = evaluate.evaluate(setup.workdir, data, tmp_path / 'a', inference=options,
                                 num_overlays=0)
  solution = _write_solution(tmp_path / 'solution.csv', indices)
  with_csv = evaluate.evaluate(setup.workdir, data, tmp_path / 'b', solution=str(solution),
                               inference=options, num_overlays=1)
  assert with_csv['predictions'] == with_masks['predictions']
  assert with_csv['inference']['strategy'] == 'resize'

  scored = official_metric.score_files(tmp_path / 'b' / 'submission.csv', solution)
  for key in ('score', 'ap_per_threshold', 'ap50', 'f1_50', 'num_images', 'num_true',
              'num_pred'):
    assert scored[key] == pytest.approx(with_csv['predictions']['accurate'][key]), key

  # Drop one image from the submission: its true nuclei become false negatives.
  dropped = f'synthetic_0_{indices[0]:05d}'
  partial = tmp_path / 'partial.csv'
  with open(tmp_path / 'b' / 'submission.csv') as src:
    rows = [r for r in csv.reader(src) if r[0] != dropped]
  with open(partial, 'w', newline='') as dst:
    csv.writer(dst).writerows(rows)
  missing = official_metric.score_files(partial, solution)
  assert missing['missing_from_submission'] == [dropped]
  per_image = list(csv.DictReader(open(tmp_path / 'b' / 'per_image.csv')))
  others = [float(r['score']) for r in per_image if r['id'] != dropped]
  assert missing['score'] == pytest.approx(sum(others) / 4, abs=1e-5)
  row = next(r for r in per_image if r['id'] == dropped)
  assert missing['fn50'] == scored['fn50'] + int(row['tp50'])  # Its matches become misses.
  assert missing['num_pred'] == scored['num_pred'] - int(row['num_pred'])


def test_fast_mode_pruned_and_pad_strategy(setup, tmp_path):
  data = synthetic_release.write_zip(tmp_path / 'images.zip', setup.val_indices[1:3])
  report = evaluate.evaluate(
      setup.workdir, data, tmp_path / 'out', num_overlays=0,
      inference=evaluate.InferenceOptions(strategy='pad', mode='fast', prune_level=1,
                                          pad_multiple=32, flips=False),
      instance_options=instances.InstanceOptions(method='components', min_size=5))
  assert sorted(report['predictions']) == ['fast', 'head1']
  assert report['predictions']['fast'] == report['predictions']['head1']
  assert report['inference']['final_heads'] == [1]


@pytest.mark.parametrize('options, match', [
    (dict(prune_level=0), r'--prune_level=0 must be in 1..2'),  # Not the default level.
    (dict(prune_level=3), r'--prune_level=3 must be in 1..2'),
    (dict(strategy='tile', batch_size=0), '--batch_size=0 must be at least 1'),
])
def test_bad_inference_options_are_refused_up_front(setup, options, match):
  with pytest.raises(ValueError, match=match):
    evaluate.Predictor(setup.config, {}, evaluate.InferenceOptions(**options))


def test_bright_background_images_are_decoded_with_their_options(setup, tmp_path):
  # Synthetic images have dark or bright backgrounds; one of each (masks in hand).
  background = {i: splits.bright_background(synthetic_nuclei.generate_example(i)['image'])
                for i in setup.val_indices[1:]}
  dark, bright = (next(i for i, b in background.items() if b == want) for want in (False, True))
  data = synthetic_release.write_zip(tmp_path / 'images.zip', [dark, bright])
  inference = evaluate.InferenceOptions(strategy='pad', pad_multiple=32, flips=False)
  options = instances.InstanceOptions(method='components', min_size=5)
  rows = {}
  for name, instance_options in (
      ('same', options), ('own', dataclasses.replace(options, bright={'threshold': 1.0}))):
    report = evaluate.evaluate(setup.workdir, data, tmp_path / name, num_overlays=0,
                               inference=inference, instance_options=instance_options)
    assert report['instances'] == dataclasses.asdict(instance_options)
    rows[name] = {r['id']: r for r in csv.DictReader(open(tmp_path / name / 'per_image.csv'))}
  dark_id, bright_id = (synthetic_nuclei.generate_example(i)['id'] for i in (dark, bright))
  assert rows['same'][bright_id]['kind'] in splits.BRIGHT_KINDS
  assert int(rows['same'][dark_id]['num_pred']) > 0 and int(rows['same'][bright_id]['num_pred']) > 0
  assert rows['own'][dark_id] == rows['same'][dark_id]
  assert int(rows['own'][bright_id]['num_pred']) == 0  # No probability exceeds 1.
  assert float(rows['own'][bright_id]['iou']) == 0


def test_flips_make_predictions_flip_equivariant(setup):
  variables, step = evaluate.load_variables(setup.workdir, setup.config)
  assert step == 40
  predictor = evaluate.Predictor(setup.config, variables, evaluate.InferenceOptions(
      strategy='pad', pad_multiple=32, flips=True))
  image = synthetic_nuclei.generate_example(3)['image'][:64, :96]
  flipped = image[::-1, ::-1]
  (_, probs), (_, probs_flipped) = predictor.predict(
      [{'id': 'a', 'image': image}, {'id': 'b', 'image': flipped}])
  np.testing.assert_allclose(probs_flipped, probs[:, ::-1, ::-1], atol=1e-5)
  assert 0.05 < probs[-1].mean() < 0.95  # A real prediction, neither empty nor full.
  # The final map alone (what segment keeps of large images) is the full prediction's last.
  final = evaluate.Predictor(setup.config, variables, evaluate.InferenceOptions(
      strategy='tile', tile_size=32, tile_overlap=16, flips=True), final_only=True)
  tiled = dataclasses.replace(predictor.options, strategy='tile', tile_size=32, tile_overlap=16)
  (_, alone), = final.predict([{'id': 'a', 'image': image}])
  (_, every), = evaluate.Predictor(setup.config, variables, tiled).predict(
      [{'id': 'a', 'image': image}])
  assert alone.shape == (1, *every.shape[1:]) and every.shape[0] > 1
  np.testing.assert_allclose(alone[0], every[-1], atol=1e-6)


def test_transpose_with_flips_makes_predictions_equivariant_to_rotations(setup):
  variables, _ = evaluate.load_variables(setup.workdir, setup.config)
  predictor = evaluate.Predictor(setup.config, variables, evaluate.InferenceOptions(
      strategy='pad', pad_multiple=64, flips=True, transpose=True))
  image = synthetic_nuclei.generate_example(3)['image'][:64, :64]
  (_, probs), (_, probs_rotated) = predictor.predict(
      [{'id': 'a', 'image': image}, {'id': 'b', 'image': np.rot90(image)}])
  np.testing.assert_allclose(probs_rotated, np.rot90(probs, axes=(1, 2)), atol=1e-5)
  flips_only = evaluate.Predictor(setup.config, variables, evaluate.InferenceOptions(
      strategy='pad', pad_multiple=64, flips=True))
  (_, probs_flips), = flips_only.predict([{'id': 'a', 'image': image}])
  assert np.abs(probs_flips - probs).max() > 1e-4  # The transposed half changes the average.


def _identity_predictor(config, strategy, **kwargs):
  """A Predictor whose 'network' returns the input's first channel as every probability."""
  predictor = evaluate.Predictor(config, None, evaluate.InferenceOptions(strategy=strategy,
                                                                         **kwargs))
  calls = []

  def forward(variables, batch):
    del variables
    calls.append(batch.shape)
    return np.broadcast_to(batch[None, ..., :1], (3, *batch.shape[:3], 1))
  predictor._forward = forward  # pylint: disable=protected-access
  return predictor, calls


@pytest.mark.parametrize('strategy, kwargs', [
    ('tile', dict(tile_size=64, tile_overlap=24, batch_size=4)),
    ('pad', dict(pad_multiple=32)),
])
def test_tiles_and_padding_reassemble_exactly(setup, strategy, kwargs):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, size=s + (3,), dtype=np.uint8)
            for s in [(40, 50), (150, 97), (64, 64), (130, 200)]]
  predictor, calls = _identity_predictor(setup.config, strategy, **kwargs)
  outputs = list(predictor.predict({'id': str(i), 'image': x} for i, x in enumerate(images)))
  assert [o[0]['id'] for o in outputs] == ['0', '1', '2', '3']
  for image, (_, probs) in zip(images, outputs):
    assert probs.shape == (3, *image.shape[:2], 1)
    np.testing.assert_allclose(probs[..., 0], np.broadcast_to(image[..., 0] / 255, probs.shape[:3]),
                               atol=1e-6)
  if strategy == 'tile':  # Tiles of all images share fixed-size batches: one shape.
    assert set(calls) == {(4, 64, 64, 3)}
    # 1 + 4x2 + 1 + 3x5 tiles of at most 64 - 24 = 40 pixels' stride, 4 per batch.
    assert len(calls) == -(-(1 + 8 + 1 + 15) // 4)


def test_resize_strategy_restores_native_size(setup):
  predictor, calls = _identity_predictor(setup.config, 'resize', batch_size=2)
  image = np.zeros((100, 140, 3), np.uint8)
  image[:, 70:] = 255
  (_, probs), = predictor.predict([{'id': 'x', 'image': image}])
  assert calls == [(2, SIZE, SIZE, 3)] and probs.shape == (3, 100, 140, 1)
  assert probs[0, :, :60, 0].max() < 0.05 and probs[0, :, 80:, 0].min() > 0.95


def test_scales_resize_each_pass_and_average_back_at_native_size(setup):
  predictor, calls = _identity_predictor(setup.config, 'pad', pad_multiple=32,
                                         scales=(0.5, 1.0, 2.0))
  image = np.zeros((64, 96, 3), np.uint8)
  image[:, 48:] = 255  # A smooth enough image that resizing down and back keeps it.
  (_, probs), = predictor.predict([{'id': 'x', 'image': image}])
  assert calls == [(1, 32, 64, 3), (1, 64, 96, 3), (1, 128, 192, 3)]
  assert probs.shape == (3, 64, 96, 1)
  assert probs[0, :, :44, 0].max() < 0.01 and probs[0, :, 52:, 0].min() > 0.99
  # The same scale twice is the plain prediction, exactly.
  once, _ = _identity_predictor(setup.config, 'pad', pad_multiple=32)
  twice, _ = _identity_predictor(setup.config, 'pad', pad_multiple=32, scales=(1.0, 1.0))
  (_, a), = once.predict([{'id': 'x', 'image': image}])
  (_, b), = twice.predict([{'id': 'x', 'image': image}])
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='must be positive'):
    _identity_predictor(setup.config, 'pad', scales=(1.0, 0.0))
  # 'resize' brings every input to the training size, whatever its scale.
  with pytest.raises(ValueError, match='--scales=0.5,1.0 needs --strategy=pad or tile'):
    _identity_predictor(setup.config, 'resize', scales=(0.5, 1.0))


def test_size_normalisation_predicts_again_at_the_trained_nucleus_size(setup):
  config = setup.config.copy_and_resolve_references()
  config.data.nucleus_diameter = 20.0
  image = np.zeros((64, 96, 3), np.uint8)
  yy, xx = np.mgrid[:64, :96]
  for y, x in [(16, 16), (16, 60), (44, 30), (44, 76)]:  # Disks 10 pixels across.
    image[(yy - y)**2 + (xx - x)**2 <= 25] = 255
  predictor, calls = _identity_predictor(config, 'pad', pad_multiple=32)
  diameter = contract.median_diameter(instances.to_instances(
      image[..., 0] / 255, options=instances.default_options(predictor.scheme)), 15)
  factor = 20.0 / diameter
  assert 1.8 < factor < 2.2
  assert predictor.magnification(image, image[..., :1] / 255) == pytest.approx(factor)
  (_, probs), = predictor.predict([{'id': 'x', 'image': image}])
  # A first pass at native size, then one at the factor (padded to a multiple of 32).
  assert calls == [(1, 64, 96, 3), (1, -(-round(64 * factor) // 32) * 32,
                                    -(-round(96 * factor) // 32) * 32, 3)]
  assert probs.shape == (3, 64, 96, 1)
  assert ((probs[0, ..., 0] > 0.5) == (image[..., 0] > 127)).mean() > 0.98  # Back at native size.
  # The same as asking for that scale, and nothing more without nuclei or without the option.
  plain, _ = _identity_predictor(setup.config, 'pad', pad_multiple=32, scales=(factor,))
  np.testing.assert_array_equal(probs, next(plain.predict([{'id': 'x', 'image': image}]))[1])
  calls.clear()
  list(predictor.predict([{'id': 'empty', 'image': np.zeros_like(image)}]))
  assert calls == [(1, 64, 96, 3)]


# ----------------------------------------------------------------------------------------------
# Bad input: clear messages naming the file or id, and no output that looks complete.


def _expect_failure(setup, tmp_path, error, match, *, data=None, solution=None, workdir=None,
                    split='all'):
  out = tmp_path / 'out'
  out.mkdir(exist_ok=True)
  (out / 'metrics.json').write_text('{"previous": true}')  # An earlier, complete evaluation.
  with pytest.raises(error, match=match):
    evaluate.evaluate(workdir or setup.workdir, data or setup.data, out, solution=solution,
                      split=split, num_overlays=0, inference=evaluate.InferenceOptions(flips=False))
  assert json.loads((out / 'metrics.json').read_text()) == {'previous': True}
  assert sorted(p.name for p in out.iterdir()) == ['metrics.json']
  assert not _leftovers(tmp_path)


def test_unreadable_image_names_the_file(setup, tmp_path):
  data = synthetic_release.write_zip(tmp_path / 'bad.zip', setup.val_indices[1:3])
  image_id = f'synthetic_0_{setup.val_indices[2]:05d}'
  with zipfile.ZipFile(data, 'a') as zf, pytest.warns(UserWarning, match='Duplicate name'):
    # A later duplicate member wins when reading: a truncated PNG.
    zf.writestr(f'stage1_train/{image_id}/images/{image_id}.png', b'\x89PNG\r\n\x1a\n broken')
  _expect_failure(setup, tmp_path, ValueError,
                  f'Cannot decode {data}:stage1_train/{image_id}/images/{image_id}.png',
                  data=data)


@pytest.mark.parametrize('rows, match', [
    (['{id},1 2 3,{h},{w}'], r'solution.csv, line 2 \(ImageId {id}, {h}x{w}\): malformed RLE'),
    (['{id},{n} 2,{h},{w}'], r'line 2 \(ImageId {id}, {h}x{w}\): RLE pixel {n1} is out of range'),
    (['{id},1 4,{h},{w}', '{id},3 4,{h},{w}'], r'line 3 \(ImageId {id}\): the mask overlaps'),
    (['{id},1 4,{h},{w}', 'nowhere,1 1,5,5'], r'solution.csv has ImageIds with no image in .*'
                                              r'nowhere'),
    (['{id},1 4,{h},{w}', '{id},9 1,{h},{w}'.replace('{w}', '{w1}')], 'line 3 .*Height/Width'),
])
def test_bad_solution_names_file_line_and_id(setup, tmp_path, rows, match):
  index = setup.val_indices[1]
  data = synthetic_release.write_zip(tmp_path / 'one.zip', [index])
  h, w = synthetic_nuclei.generate_example(index)['label'].shape
  fields = dict(id=f'synthetic_0_{index:05d}', h=h, w=w, w1=w + 1, n=h * w, n1=h * w + 1)
  solution = tmp_path / 'solution.csv'
  solution.write_text('ImageId,EncodedPixels,Height,Width\n'
                      + ''.join(r.format(**fields) + '\n' for r in rows))
  _expect_failure(setup, tmp_path, ValueError, match.format(**fields), data=data,
                  solution=str(solution))


def test_ids_missing_from_solution_or_data(setup, tmp_path):
  data = synthetic_release.write_zip(tmp_path / 'two.zip', setup.val_indices[1:3])
  solution = _write_solution(tmp_path / 'solution.csv', setup.val_indices[1:2])
  missing = f'synthetic_0_{setup.val_indices[2]:05d}'
  _expect_failure(setup, tmp_path, ValueError, f'has no rows for 1 image.* {missing}', data=data,
                  solution=str(solution))
  _expect_failure(setup, tmp_path, ValueError, 'lacks 10 image.*of the requested split',
                  data=data, split='validation')
  image_id = f'synthetic_0_{setup.val_indices[1]:05d}'
  wrong_shape = tmp_path / 'wrong.csv'
  wrong_shape.write_text(f'ImageId,EncodedPixels,Height,Width\n{image_id},1 1,20,20\n'
                         f'{missing},,20,20\n')
  _expect_failure(setup, tmp_path, ValueError, f'ImageId {image_id} is 20x20 .* but its image',
                  data=data, solution=str(wrong_shape))


def test_workdir_without_checkpoints_or_config(setup, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  _expect_failure(setup, tmp_path, FileNotFoundError, f'{empty}/config.json not found',
                  workdir=empty)
  (empty / 'config.json').write_text((setup.workdir / 'config.json').read_text())
  _expect_failure(setup, tmp_path, FileNotFoundError, f'No checkpoint in {empty}/checkpoints',
                  workdir=empty)
  # A run that failed on its data: "no checkpoint" is what to fix first, not the data error.
  stored = json.loads((setup.workdir / 'config.json').read_text())
  stored['data'].update(dataset='dsb2018', manual_dir=str(tmp_path / 'nope'))
  (empty / 'config.json').write_text(json.dumps(stored))
  _expect_failure(setup, tmp_path, FileNotFoundError, f'No checkpoint in {empty}/checkpoints',
                  workdir=empty, split='validation')
  assert not (empty / 'checkpoints').exists()  # Evaluation never creates anything in a workdir.


def test_output_that_is_not_an_earlier_evaluation_is_refused(setup, tmp_path):
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'keep.txt').write_text('mine')
  for output in (notes, setup.workdir):
    with pytest.raises(FileExistsError, match=f'--output {output} holds files but no metrics'):
      evaluate.evaluate(setup.workdir, setup.data, output, num_overlays=0)
  assert (notes / 'keep.txt').read_text() == 'mine' and (setup.workdir / 'config.json').exists()
  assert not _leftovers(tmp_path)


def test_checkpoint_removed_during_evaluation_keeps_the_results(setup, tmp_path, monkeypatch):
  """Training keeps only its newest checkpoints: the one being evaluated may go meanwhile."""
  workdir = tmp_path / 'work'
  shutil.copytree(setup.workdir, workdir)
  to_instances = instances.to_instances

  def remove_checkpoint_then_decode(*args, **kwargs):
    shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)
    return to_instances(*args, **kwargs)
  monkeypatch.setattr(instances, 'to_instances', remove_checkpoint_then_decode)
  report = evaluate.evaluate(workdir, setup.data, tmp_path / 'out', split='validation',
                             num_overlays=0, inference=evaluate.InferenceOptions(flips=False))
  assert not (workdir / 'checkpoints').exists()
  assert report['weights'] == 'trained' and report['num_images'] == len(setup.val_ids)
  written = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  assert (written['weights'], written['score']) == ('trained', report['score'])


def test_cli_reports_bad_input_without_traceback(setup, tmp_path):
  result = _run('evaluate', f'--workdir={tmp_path}', f'--data={setup.data}',
                f'--output={tmp_path / "out"}')
  assert result.returncode == 1
  assert f'error: {tmp_path}/config.json not found' in result.stderr
  assert 'Traceback' not in result.stderr and not (tmp_path / 'out').exists()


def test_native_size_inference_reproduces_training_size_predictions(setup):
  # A crop-trained model is evaluated at native size ('auto' -> 'pad'); where the native input
  # coincides with a training-size input (an image of the crop size, or one tile of a larger
  # image), the probabilities are those of the training-size forward pass (eval_step's).
  from unetpp_jax import models  # pylint: disable=g-import-not-at-top
  config = setup.config.copy_and_resolve_references()
  config.data.train_preprocess = 'crop'
  variables, _ = evaluate.load_variables(setup.workdir, config)
  model = models.create_model(config.model)
  image = synthetic_nuclei.generate_example(5)['image'][:2 * SIZE, :2 * SIZE]

  def training_size(x):  # Foreground probability of every head, [heads, SIZE, SIZE].
    logits = model.apply(variables, x[None].astype(np.float32) / 255, train=False)
    return np.stack([np.asarray(models.foreground_probability(l))[0] for l in logits])

  predictor = evaluate.Predictor(config, variables, evaluate.InferenceOptions(pad_multiple=SIZE,
                                                                             flips=False))
  assert predictor.strategy == 'pad'
  (_, probs), = predictor.predict([{'id': 'a', 'image': image[:SIZE, :SIZE]}])
  np.testing.assert_allclose(probs[:-1, ..., 0], training_size(image[:SIZE, :SIZE]), atol=1e-5)
  tiles = evaluate.Predictor(config, variables, evaluate.InferenceOptions(
      strategy='tile', tile_size=SIZE, tile_overlap=0, flips=False))
  (_, probs), = tiles.predict([{'id': 'b', 'image': image}])
  for y in (0, SIZE):
    for x in (0, SIZE):
      # Tiles run in batches of 8, the reference alone: XLA's float32 convolutions then sum in
      # a different order (differences up to ~1e-4).
      np.testing.assert_allclose(probs[:-1, y:y + SIZE, x:x + SIZE, 0],
                                 training_size(image[y:y + SIZE, x:x + SIZE]), atol=3e-4)


def test_sweep_scores_every_variant_per_kind_and_reuses_its_cache(setup, tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  cache = tmp_path / 'predictions.npz'
  command = [sys.executable, '-m', 'unetpp_jax.sweep_instances', f'--workdir={setup.workdir}',
             f'--data={setup.data}', '--limit=3', '--noflips', f'--cache={cache}']
  results, written = [], []
  for _ in range(2):
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'os.fork()' not in result.stderr  # The scoring workers never run JAX.
    results.append(json.loads(result.stdout))
    written.append(cache.stat().st_mtime_ns)
  first, second = results
  assert first['num_images'] == 3 and first['default'] == str(
      instances.default_options(LabelScheme()))
  changes = [v['change'] for v in first['variants']]
  assert 'default' in changes and {'method': 'components'} in changes
  assert {'seed_h': 1.5} in changes and {'seed_h_per_radius': 0.1} in changes  # Distance seeds'.
  assert {'smooth': 2.0} in changes and {'threshold': 0.7} in changes
  assert not any(isinstance(c, dict) and 'marker_threshold' in c for c in changes)  # Boundary's.
  assert sum(isinstance(c, dict) and c.get('seeds') == 'product' for c in changes) == 9
  for variant in first['variants']:
    assert 0 <= variant['score'] <= 1 and set(variant['per_kind']) <= set(splits.KINDS)
  assert second['variants'] == first['variants'] and written[1] == written[0]  # From the cache.


def test_sweep_of_a_three_class_model_tries_every_seed_and_the_options_its_seeds_read():
  # In a subprocess: sweep_instances defines absl flags that inference_flags defines too.
  script = """
import dataclasses
import json
from unetpp_jax import sweep_instances
from unetpp_jax.evaluation import instances
from unetpp_jax.label_scheme import LabelScheme
scheme = LabelScheme(num_classes=3, contact_width=2)
for bright in ({}, {'seeds': 'interior'}):
  default = instances.default_options(scheme)
  default = dataclasses.replace(default, bright={**default.bright, **bright})
  print(json.dumps(sweep_instances.variants(scheme, default)))
"""
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
  distance, interior = (json.loads(line) for line in result.stdout.splitlines()[-2:])
  # Distance seeds everywhere: the other seeds are scored, not the marker threshold.
  assert {'seeds': 'boundary'} in distance and {'seeds': 'interior'} in distance
  assert {'seeds': 'distance'} not in distance and {'smooth': 2.0} in distance
  assert not any('marker_threshold' in c for c in distance)
  # Interior seeds on bright backgrounds: their marker threshold is swept, and every seed.
  assert {'marker_threshold': 0.5} in interior and {'seeds': 'distance'} in interior
  for changes in (distance, interior):
    assert changes[0] == {} and changes[-1] == {'method': 'components'}
