"""The generated parts of the docs agree with the code and the result files (tools/make_docs.py), and
the configs the model zoo calls verified against the official logits are those with reference vectors."""

import pytest

from conftest import ROOT, VECTORS
from tools import make_docs, results_tables


def test_every_generated_part_agrees_with_the_code_and_the_results():
    assert make_docs.stale_pages() == [], 'run python tools/make_docs.py'


def test_the_configs_verified_against_official_logits_are_those_with_reference_vectors():
    if not VECTORS.is_dir():
        pytest.skip(f'{VECTORS} not available')
    configs = {path.stem for path in (ROOT / 'configs').glob('*.yaml')}
    assert set(results_tables.REFERENCE_VECTORS) == {path.stem for path in VECTORS.glob('*.pt')} & configs
