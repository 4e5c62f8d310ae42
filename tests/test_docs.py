"""The docs tell the truth: no measured number is typed by hand, every repository path they name
exists, and the README's commands run as written on a fresh checkout (the generated parts:
test_generated_docs.py)."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

import evaluate
import infer
import train
from conftest import ROOT
from engine.rules import load_config
from tools import convert_checkpoint, export_onnx

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
DOCUMENTS = [
    *PAGES,
    ROOT / 'ARCHITECTURES.md',
    ROOT / 'CONTRIBUTING.md',
    ROOT / 'configs' / 'README.md',
    ROOT / 'datasets' / 'README.md',
    ROOT / 'benchmarks' / 'README.md',
]
GENERATED = re.compile(r'<!-- generated: (\S+) -->.*?<!-- end of generated: \1 -->', re.S)
FENCED = re.compile(r'^```.*?^```', re.S | re.M)
INLINE_CODE = re.compile(r'`[^`\n]+`')
LINK_TARGET = re.compile(r'\]\(([^)\s]+)\)')


def prose(text: str) -> str:
    """What is written by hand and read as text: no generated parts, code, link targets or comments."""
    for pattern in (GENERATED, FENCED, INLINE_CODE, LINK_TARGET, re.compile(r'<!--.*?-->', re.S)):
        text = pattern.sub(' ', text)
    return text


def test_the_readme_is_a_front_door():
    assert len((ROOT / 'README.md').read_text().splitlines()) <= 220


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_no_measured_number_is_typed_by_hand(page):
    """Decimals, percentages, speed ratios and times belong to the result files; the generated parts
    show them."""
    measured = re.compile(r'\d+\.\d+|\d+\s?%|\b\d+(\.\d+)?x\b|\b\d+\s?(ms|s|min|h|GB|MB)\b')
    found = [match.group() for match in measured.finditer(prose(page.read_text()))]
    assert not found, f'{page.name}: {found}'


def repository_paths(document: Path) -> list:
    """Relative link targets (from the document's folder) and code spans that name a repository path
    (from the root). mmseg's config paths (`configs/<model>/<name>.py`) name files of mmseg's tree."""
    text = document.read_text()
    paths = [
        document.parent / target.split('#')[0]
        for target in LINK_TARGET.findall(text)
        if not target.startswith(('http', '#', 'mailto:'))
    ]
    tops = ('train.py', 'evaluate.py', 'infer.py', 'configs/', 'models/', 'datasets/', 'engine/', 'tools/')
    tops += ('tests/', 'benchmarks/', 'docs/', '.ci/')
    for span in INLINE_CODE.findall(text):
        words = span.strip('`').split()
        candidate = words[0].split('::')[0].rstrip(':,') if words else ''
        if not candidate.startswith(tops) or re.search(r'[*<>{}\[\]]|\.\.\.', candidate):
            continue
        if candidate.startswith('configs/') and candidate.endswith('.py'):
            continue
        paths.append(ROOT / candidate)
    return paths


@pytest.mark.parametrize('document', DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_in_the_docs_exists(document):
    missing = sorted({str(path) for path in repository_paths(document) if not path.exists()})
    assert not missing, f'{document.relative_to(ROOT)} names {missing}'


# --- the README's commands -------------------------------------------------------------------------


def readme_commands() -> list:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / 'README.md').read_text()
    commands = []
    for block in re.findall(r'^```bash\n(.*?)^```', text, re.S | re.M):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split(' #')[0].strip()
            if line and not line.startswith('#'):
                commands += [part.strip() for part in line.split('&&')]
    return commands


SCRIPTS = {
    'train.py': train,
    'evaluate.py': evaluate,
    'infer.py': infer,
    'tools/export_onnx.py': export_onnx,
    'tools/convert_checkpoint.py': convert_checkpoint,
}
SHORT_RUN = ['--set', 'train.max_iters=2', 'train.val_interval=2', 'train.log_interval=1']
"""Appended to the README's training commands: the run is what the command starts, two iterations long."""


def script_and_arguments(command: str) -> tuple:
    words = shlex.split(command)
    if words[0] == 'torchrun':
        words = words[next(i for i, word in enumerate(words) if word.endswith('.py')) :]
        return words[0], words[1:], 'torchrun'
    assert words[0] == 'python', command
    return words[1], words[2:], 'python'


def test_the_readme_installs_and_tests_as_ci_does():
    """CI (.ci/run) runs the README's install and test commands, in a fresh virtual environment."""
    ci = (ROOT / '.ci' / 'run').read_text().replace('PIP_QUIET=1 ', '')
    setup = [c for c in readme_commands() if c.startswith(('python -m venv', 'source', 'pip', 'python -m pytest'))]
    assert len(setup) == 4 and all(command in ci for command in setup)


def test_the_readme_commands_run_as_written_on_a_fresh_checkout(tmp_path, monkeypatch, capsys, demo_root):
    """In README order, in a checkout with nothing generated: what needs a dataset or a file that is
    not here (ADE20K, an official checkpoint, ImageNet weights), or several GPUs, is parsed and its
    config checked; the rest runs, training two iterations long. The conversion command runs in
    test_first_hour.py."""
    for name in ('train.py', 'evaluate.py', 'infer.py', 'configs', 'tools'):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / 'data').mkdir()
    shutil.copytree(demo_root, tmp_path / 'data' / 'demo')
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in readme_commands():
        if command.startswith(('python -m', 'source', 'pip')):
            continue
        script, arguments, launcher = script_and_arguments(command)
        assert (ROOT / script).is_file(), command
        module = SCRIPTS[script]
        needs_absent_files = any(word.startswith(('offseg-t_ade20k', 'work_dirs/offseg_t')) for word in arguments)
        if launcher == 'torchrun' or needs_absent_files:
            args = module.parse_args(arguments)
            if getattr(args, 'config', None):
                load_config(args.config, [*getattr(args, 'set', []), 'backbone.pretrained=null'])
            continue
        module.main(arguments + SHORT_RUN if script == 'train.py' else arguments)
        ran.append(command)
    assert len(ran) >= 6 and (tmp_path / 'work_dirs' / 'demo' / 'best.pth').is_file()
    # the quick start's run ends with a line naming its best mIoU and the checkpoint, as the README says
    assert re.search(
        r'^[\d-]+ [\d:]+  done: best mIoU [\d.]+ at iteration 2; checkpoint work_dirs/demo/best.pth',
        capsys.readouterr().out,
        re.M,
    )


@pytest.mark.parametrize(
    'script',
    [ROOT / name for name in ('train.py', 'evaluate.py', 'infer.py')] + sorted((ROOT / 'tools').glob('*.py')),
    ids=lambda p: p.name,
)
def test_help_texts_name_only_configs_that_exist(script):
    """A script's help (its module docstring) shows commands a user copies: their configs exist."""
    named = re.findall(r'configs/[\w/.-]+\.yaml', script.read_text().split('"""')[1])
    assert [name for name in named if not (ROOT / name).is_file()] == []
