"""Loss terms and metrics are extension points: CONTRIBUTING.md's worked example (a focal loss and
the false-discovery rate), run as written in a fresh process, is accepted by the config, trains and is
reported (configs/README.md's option tables, generated from the code, are checked by tests/test_generated_docs.py)."""

import re
import subprocess
import sys
import textwrap

from conftest import INTERPRETER_DIR, ROOT

USE_IT = """
import json
import torch
from engine.losses import build_criterion
from engine.metrics import ConfusionMatrix
from engine.rules import load_config

overrides = ['train.loss.ce=0', 'train.loss.focal=1.0', 'train.loss.gamma=1.5', 'eval.metrics=[mIoU,mFDR]']
cfg = load_config('configs/demo.yaml', overrides)
criterion = build_criterion(cfg)
logits = torch.randn(2, 5, 8, 8, requires_grad=True)
terms = criterion.terms(logits, torch.randint(0, 5, (2, 8, 8)))
terms['loss'].backward()
confusion = ConfusionMatrix(2, 255)
confusion.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
refused = []
for bad in ([*overrides[:2], 'train.loss.gamma=-1'], ['train.loss.gamma=3'], ['eval.metrics=[mFDR,mNope]']):
    try:
        load_config('configs/demo.yaml', bad)
    except ValueError as error:
        refused.append(str(error))
print(json.dumps({'terms': sorted(terms), 'gamma': criterion.terms_by_name['focal'][1].gamma,
                  'metrics': confusion.compute(cfg['eval']['metrics']), 'refused': refused,
                  'grad': bool(logits.grad.abs().sum() > 0)}))
"""


def worked_example() -> str:
    section = (ROOT / 'CONTRIBUTING.md').read_text().split('## Adding a loss term or a metric')[1].split('\n## ')[0]
    (code,) = re.findall(r'```python\n(.*?)```', section, re.DOTALL)
    return code


def test_the_contributing_example_adds_a_loss_term_and_a_metric():
    import json

    result = subprocess.run(
        [sys.executable, '-c', worked_example() + textwrap.dedent(USE_IT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={'PATH': INTERPRETER_DIR, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out['terms'] == ['focal', 'loss'] and out['gamma'] == 1.5 and out['grad']
    assert out['metrics']['mFDR'] == 100 * (1 / 2 + 0) / 2 and len(out['metrics']['FDR']) == 2  # class 0: 1 of 2
    gamma, off, unknown = out['refused']
    assert "'train.loss.gamma' must be a number >= 0, got -1" in gamma
    assert "'train.loss.gamma' is an option of the focal term, whose weight 'train.loss.focal' is 0" in off
    assert "'eval.metrics' names 'mNope'" in unknown
