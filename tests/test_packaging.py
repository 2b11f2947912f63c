"""What `pip install .` installs: every package under unetpp_jax/, configs/ as unetpp_jax.configs
(no top-level `configs`), and requirements.txt's pins as the dependencies."""

import pathlib

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip('tomllib')  # Python 3.11+.

REPO = pathlib.Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
  return tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools']


def test_every_package_is_installed_and_configs_only_inside_unetpp_jax():
  setuptools = _setuptools()
  found = {'.'.join(p.parent.relative_to(REPO).parts)
           for p in (REPO / 'unetpp_jax').rglob('__init__.py')}
  assert set(setuptools['packages']) == found | {'unetpp_jax.configs'}
  assert setuptools['package-dir'] == {'unetpp_jax.configs': 'configs'}
  assert (REPO / 'configs' / 'dsb_paper.py').is_file()


def test_dependencies_are_the_pinned_requirements():
  assert _setuptools()['dynamic']['dependencies'] == {'file': ['requirements.txt']}
  lines = [l.strip() for l in (REPO / 'requirements.txt').read_text().splitlines()]
  requirements = [Requirement(l) for l in lines if l and not l.startswith('#')]
  names = {r.name for r in requirements}
  assert {'jax', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections'} <= names
  assert all(len(r.specifier) == 1 and str(r.specifier).startswith('==') for r in requirements)
