"""The experiment trackers a run reports to besides train.log and metrics.jsonl: `output.loggers`, any of
TensorBoard (the default), Weights & Biases and MLflow. Each gets the scalars, the per-class values,
the validation pictures and the resolved config (its values and the config.yaml file), under the
run's name (its work dir's). W&B and MLflow are imported only when named
(`pip install -r requirements-trackers.txt`); their settings come from their own environment
variables, as with the HF Trainer's `report_to`: WANDB_PROJECT (default: segmentation), WANDB_MODE
(`offline` writes the run to <work_dir>/wandb for `wandb sync`), MLFLOW_TRACKING_URI (a server, a
database, or `file:./mlruns` with MLFLOW_ALLOW_FILE_STORE=true) and MLFLOW_EXPERIMENT_NAME.
"""

import importlib.util
import os
import re
import shutil
from pathlib import Path

import yaml

from .config import flatten

DEFAULT_PROJECT = 'segmentation'


class TensorBoard:
    package = 'tensorboard'

    def __init__(self, work_dir: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(work_dir / 'tensorboard'))

    def scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, step: int, images: dict) -> None:
        for tag, image in images.items():
            self.writer.add_image(tag, image, step, dataformats='HWC')

    def config(self, cfg: dict, path: Path) -> None:
        """Preformatted text (TensorBoard renders Markdown: indenting keeps it verbatim)."""
        self.writer.add_text('config', '\n'.join('    ' + line for line in path.read_text().splitlines()))

    def close(self) -> None:
        self.writer.close()


class WeightsAndBiases:
    package = 'wandb'

    def __init__(self, work_dir: Path, run_name: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get('WANDB_PROJECT', DEFAULT_PROJECT), name=run_name, dir=work_dir)

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def images(self, step: int, images: dict) -> None:
        self.run.log({tag: self.wandb.Image(image) for tag, image in images.items()}, step=step)

    def config(self, cfg: dict, path: Path) -> None:
        """The values, and the file as train_config.yaml (W&B keeps its own config.yaml in the run's files)."""
        self.run.config.update(cfg, allow_val_change=True)
        shutil.copyfile(path, Path(self.run.dir) / 'train_config.yaml')

    def close(self) -> None:
        self.run.finish()


class MLflow:
    package = 'mlflow'

    def __init__(self, work_dir: Path, run_name: str):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)

    def scalars(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics({metric_name(tag): value for tag, value in values.items()}, step=step)

    def images(self, step: int, images: dict) -> None:
        for tag, image in images.items():
            self.mlflow.log_image(image, key=metric_name(tag), step=step)

    def config(self, cfg: dict, path: Path) -> None:
        self.mlflow.log_params({key: flow(value)[:PARAM_LENGTH] for key, value in flatten(cfg).items()})
        self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {'tensorboard': TensorBoard, 'wandb': WeightsAndBiases, 'mlflow': MLflow}
REQUIREMENTS = 'requirements-trackers.txt'
PARAM_LENGTH = 500  # an MLflow parameter's value is kept to this many characters


def missing_package(name: str):
    """The package tracker `name` needs, if it is not installed (None otherwise)."""
    package = TRACKERS[name].package
    return None if importlib.util.find_spec(package) else package


def metric_name(tag: str) -> str:
    """MLflow takes letters, digits and _ - . space / in names; anything else (a class name's ';') becomes _."""
    return re.sub(r'[^\w\-. /]', '_', tag)


def flow(value) -> str:
    """A config value as one line of YAML, as an MLflow parameter holds it."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('\n...')
