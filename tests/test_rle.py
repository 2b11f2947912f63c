"""Kaggle run-length encoding: column-major, 1-indexed `start length` pairs, and the CSV files."""

import numpy as np
import pytest

from unetpp_jax.evaluation import rle


def test_encode_is_column_major_and_one_indexed():
  mask = np.zeros((3, 4), bool)
  mask[0, 0] = True  # pixel 1
  mask[1, 0] = mask[2, 0] = mask[0, 1] = True  # pixels 2, 3 and 4 (the next column): one run
  mask[2, 3] = True  # the last pixel, 12
  assert rle.encode(mask) == '1 4 12 1'
  assert rle.encode(np.ones((3, 4), bool)) == '1 12'
  assert rle.encode(np.zeros((3, 4), bool)) == ''
  # A row vector: each pixel is its own column, so consecutive columns make one run.
  assert rle.encode(np.array([[0, 1, 1, 0, 1]])) == '2 2 5 1'


@pytest.mark.parametrize('shape', [(1, 1), (1, 7), (7, 1), (5, 8), (13, 6)])
def test_round_trip_on_random_masks_including_edges(shape):
  rng = np.random.default_rng(shape)
  for density in (0.1, 0.5, 0.9):
    mask = rng.random(shape) < density
    mask[0, 0] = mask[-1, -1] = True  # First and last pixel.
    assert np.array_equal(rle.decode(rle.encode(mask), shape), mask)
  edges = np.zeros(shape, bool)
  edges[:, 0] = edges[:, -1] = edges[0, :] = edges[-1, :] = True
  assert np.array_equal(rle.decode(rle.encode(edges), shape), edges)


def test_decode_known_string():
  mask = rle.decode('1 3 10 5', (4, 4))
  expected = np.zeros(16, bool)
  expected[[0, 1, 2, 9, 10, 11, 12, 13]] = True
  assert np.array_equal(mask, expected.reshape((4, 4), order='F'))
  assert not rle.decode('', (2, 2)).any()


@pytest.mark.parametrize('text, message', [
    ('1 2 3', 'odd number'),
    ('1 2 x 1', "'x' is not a non-negative integer"),
    ('1 -2', "'-2' is not a non-negative integer"),
    ('0 2', 'positive'),
    ('3 0', 'positive'),
    ('5 2 1 2', 'sorted'),
    ('1 3 3 2', 'overlap'),
    ('15 2', 'pixel 16 is out of range: the image has 15 pixels'),
])
def test_decode_rejects_malformed_and_out_of_range(text, message):
  with pytest.raises(ValueError, match=message):
    rle.decode(text, (3, 5))


def test_adjacent_runs_are_allowed():
  assert rle.decode('1 2 3 2', (2, 2)).all()


def test_instances_and_submission_rows():
  label = np.zeros((4, 4), np.int32)
  label[0, 0] = 3
  label[2:, 2:] = 7
  assert rle.encode_instances(label) == ['1 1', '11 2 15 2']
  assert list(rle.submission_rows('a', label)) == [('a', '1 1'), ('a', '11 2 15 2')]
  assert list(rle.submission_rows('b', np.zeros((2, 2)))) == [('b', '')]


def _write(path, text):
  path.write_text(text)
  return path


def test_read_solution_builds_label_maps(tmp_path):
  path = _write(tmp_path / 'sol.csv',
                'ImageId,EncodedPixels,Height,Width,Usage\n'
                'a,1 2,3,2,Public\n'
                'a,4 2,3,2,Public\n'
                'b,,2,2,Private\n')
  rows = rle.read_csv(path, require_shape=True)
  assert sorted(rows) == ['a', 'b']
  assert rows['a'].shape == (3, 2)
  np.testing.assert_array_equal(rows['a'].label_map(path), [[1, 2], [1, 2], [0, 0]])
  assert not rows['b'].label_map(path).any()


@pytest.mark.parametrize('text, message', [
    ('ImageId,EncodedPixels\na,1 1\n', r"missing column\(s\) \['Height', 'Width'\]"),
    ('ImageId,EncodedPixels,Height,Width\na,1 1,0,2\n', 'line 2 .ImageId a.: Height/Width'),
    ('ImageId,EncodedPixels,Height,Width\na,1 1,2,2\na,2 1,3,2\n', 'line 3 .ImageId a.: Height'),
    ('ImageId,EncodedPixels,Height,Width\n,1 1,2,2\n', 'line 2: empty ImageId'),
])
def test_read_csv_errors_name_file_and_line(tmp_path, text, message):
  path = _write(tmp_path / 'sol.csv', text)
  with pytest.raises(ValueError, match=message) as info:
    rle.read_csv(path, require_shape=True)
  assert str(path) in str(info.value)


@pytest.mark.parametrize('rles, message', [
    (['1 2', '2 2'], 'line 3 .ImageId a.: the mask overlaps the mask of line 2'),
    (['1 2', '4 9'], r'line 3 .ImageId a, 3x3.: RLE pixel 12 is out of range'),
    (['1 2', '1 x'], r'line 3 .ImageId a, 3x3.: malformed RLE'),
])
def test_label_map_errors_name_line_and_image(tmp_path, rles, message):
  text = 'ImageId,EncodedPixels,Height,Width\n' + ''.join(f'a,{r},3,3\n' for r in rles)
  path = _write(tmp_path / 'sol.csv', text)
  rows = rle.read_csv(path, require_shape=True)
  with pytest.raises(ValueError, match=message):
    rows['a'].label_map(path)


def test_write_then_read_submission(tmp_path):
  label = np.zeros((5, 6), np.int32)
  label[1:3, 1:4] = 1
  label[4, :] = 2
  path = tmp_path / 'sub.csv'
  rle.write_csv(path, [*rle.submission_rows('x', label), *rle.submission_rows('y', label * 0)])
  rows = rle.read_csv(path, require_shape=False)
  assert rows['y'].rles == []
  np.testing.assert_array_equal(rows['x'].label_map(path, (5, 6)), label)
