"""segmentation_models_pytorch's CamVid example as a peer: its recipe on this repo's data, budget and scoring.

    pip install -r benchmarks/requirements.txt
    OMP_NUM_THREADS=1 nice python benchmarks/peer_smp_camvid.py [--config configs/camvid.yaml] [--ours work_dirs/camvid]

The peer is the recipe of SMP's examples/camvid_segmentation_multiclass.ipynb as a practitioner would
run it here (nothing can be downloaded, so the encoder starts from random weights):
  model      smp.FPN(encoder_name='resnet18', encoder_weights=None, classes=<the config's>)
  loss       smp.losses.DiceLoss('multiclass', from_logits=True), the ignore label left out
  optimizer  Adam, lr 2e-4, CosineAnnealingLR over the run down to 1e-5, stepped every iteration
  data       albumentations: HorizontalFlip; ShiftScaleRotate (scale ±0.5, shift ±0.1, no rotation);
             pad and random crop to the crop size; GaussNoise (p 0.2); Perspective (p 0.5); one of
             CLAHE / brightness-contrast / gamma (p 0.9); one of sharpen / blur / motion blur (p 0.9);
             one of brightness-contrast / hue-saturation (p 0.9). Padding and warps fill the label
             with the ignore label, as the notebook fills with its "unlabelled" class.
What it shares with --config: the train and val images (build_dataset), the crop size (the train
pipeline's random_crop), batch, iterations, validation points (every train.val_interval and the
last iteration), data.mean / data.std and the scoring (engine.evaluation with the config's eval
section: whole val images padded to a multiple of 32, mIoU over the classes, ignore label left out).

The peer's curve is kept in <out>/peer.json with what it was trained on (data, budget, scoring, seed)
and reused while those match, so trying a new recipe of ours does not retrain the peer. A peer run that
was stopped continues from its last log line (<out>/peer_state.pth, every train.log_interval), or from
where SIGTERM or Ctrl-C stopped it (as train.py, it saves then), and ends as the uninterrupted run does:
the iterations up to each validation point draw their batches and augmentation from a stream seeded by
(seed, which validation point) alone.

Ours is a train.py run of --config: the val mIoU of each validation read from --ours (a run's folder,
its metrics.jsonl), or trained here into <out>/ours (`--resume auto`; with --side-by-side, as a train.py process
while the peer trains, on a core of its own at OMP_NUM_THREADS=1); where the run keeps a moving average
of its weights (train.ema_decay), that average is what the recipe delivers and what is compared.
Printed: both curves, ours − peer and ours / peer at each validation point, and both wall times (for
--ours, from its start to its last record); written to <out>/peer_smp_camvid.json, and with --results as
the result file the docs render (camvid_peer: the head-to-head of the README, measured by

    OMP_NUM_THREADS=2 nice python benchmarks/peer_smp_camvid.py --results benchmarks/results

each run alone on the machine, one after the other).
"""

import itertools
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from ablation import resumable_run, train_process  # noqa: E402

import train  # noqa: E402
from datasets.transforms import albumentations  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.cli import ArgumentParser, number, run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.data import build_dataset  # noqa: E402
from engine.evaluation import evaluate  # noqa: E402
from engine.inference import normalize  # noqa: E402
from engine.logger import METRICS_FILE, run_seconds, validation_curve  # noqa: E402
from engine.outputs import write_results  # noqa: E402
from engine.preemption import StopRequest, ignore_stop_signals  # noqa: E402
from engine.rules import load_config  # noqa: E402
from engine.training import get_rng_state, set_rng_state  # noqa: E402
from tools.measure import chosen_device, write_result_table  # noqa: E402

DEFAULT_CONFIG = 'configs/camvid.yaml'


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument(
        '--config', default=DEFAULT_CONFIG, help=f'data, budget and scoring (default: {DEFAULT_CONFIG})'
    )
    parser.add_overrides('overrides of --config, for both (e.g. train.max_iters=600)')
    parser.add_argument(
        '--ours', type=Path, help='a finished train.py run of --config (its folder); default: train one'
    )
    parser.add_argument('--out', type=Path, default=Path('work_dirs/peer_smp_camvid'), help='(default: %(default)s)')
    parser.add_argument('--seed', type=number(int, 0), default=0, help="the peer's seed (default: 0)")
    parser.add_argument(
        '--side-by-side',
        action='store_true',
        help='train ours as its own train.py process while the peer trains here (a core each at OMP_NUM_THREADS=1)',
    )
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument(
        '--results', type=Path, metavar='DIR', help='also write both curves and wall times as a result file there'
    )
    return parser.parse_args(argv)


# -------------------------------------------------------------------------------------------- peer


def crop_size(cfg: dict) -> tuple:
    """(height, width) of the train pipeline's crop (a random_crop step, or an albumentations step's
    RandomCrop): the peer crops to the same size."""
    for step in cfg['data']['train']['pipeline']:
        if step['type'] == 'random_crop':
            height, width = step['size']
            return height, width
        if step['type'] == 'albumentations':
            crops = [transform for transform in step['transforms'] if transform['type'] == 'RandomCrop']
            if crops:
                return crops[0]['height'], crops[0]['width']
    raise ConfigError(
        "the peer crops as the config does, but data.train.pipeline has no 'random_crop' step "
        '(nor an albumentations RandomCrop)'
    )


def peer_augmentation(size: tuple, ignore_index: int, seed: int):
    """The notebook's training augmentation, cropping to `size` and filling labels with `ignore_index`."""
    A = albumentations()
    height, width = size
    fill = {'border_mode': 0, 'fill': 0, 'fill_mask': ignore_index}
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.ShiftScaleRotate(scale_limit=0.5, rotate_limit=0, shift_limit=0.1, p=1, **fill),
            A.PadIfNeeded(min_height=height, min_width=width, **fill),
            A.RandomCrop(height=height, width=width),
            A.GaussNoise(p=0.2),
            A.Perspective(p=0.5, **fill),
            A.OneOf([A.CLAHE(p=1), A.RandomBrightnessContrast(p=1), A.RandomGamma(p=1)], p=0.9),
            A.OneOf([A.Sharpen(p=1), A.Blur(blur_limit=3, p=1), A.MotionBlur(blur_limit=3, p=1)], p=0.9),
            A.OneOf([A.RandomBrightnessContrast(p=1), A.HueSaturationValue(p=1)], p=0.9),
        ],
        seed=seed,
    )


class Augmented(Dataset):
    """The config's training pairs (raw, labels as train ids) through the peer's augmentation."""

    def __init__(self, dataset, augmentation):
        self.dataset, self.augmentation = dataset, augmentation

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset.load(index)
        sample = self.augmentation(image=image, mask=label)
        image = torch.from_numpy(np.ascontiguousarray(sample['image'].transpose(2, 0, 1)))
        return image, torch.from_numpy(sample['mask'].astype(np.int64))


def reseed_worker(worker_id: int) -> None:
    """Each loader worker its own augmentation stream (a copied Compose would repeat its parent's); a stop
    signal is the main process's to handle (engine/preemption.py)."""
    ignore_stop_signals(worker_id)
    info = torch.utils.data.get_worker_info()
    info.dataset.augmentation.set_random_seed(info.seed % 2**32)


def stretch_batches(augmented: Augmented, cfg: dict, seed: int, stretch: int, count: int, skip: int = 0):
    """Training batches `skip` to `count` of the `stretch`-th run of iterations up to a validation point,
    in an order and with an augmentation seeded by (seed, stretch) alone: a run resumed within a stretch
    draws (and drops) the batches it had trained on, and sees the batches the uninterrupted run sees."""
    stream = int(np.random.SeedSequence([seed, stretch]).generate_state(1)[0])
    augmented.augmentation.set_random_seed(stream)
    workers = cfg['data']['workers']
    loader = DataLoader(
        augmented,
        batch_size=cfg['train']['batch_size'],
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        worker_init_fn=reseed_worker,
        generator=torch.Generator().manual_seed(stream),
        persistent_workers=workers > 0,
    )
    epochs = (batch for _ in itertools.count() for batch in loader)
    return itertools.islice(epochs, skip, count)


def peer_training(num_classes: int, ignore_index: int, device: torch.device) -> tuple:
    """The notebook's model, loss and optimizer: (FPN-ResNet18 from random weights, Dice, Adam 2e-4)."""
    import segmentation_models_pytorch as smp

    model = smp.FPN(encoder_name='resnet18', encoder_weights=None, classes=num_classes).to(device)
    dice = smp.losses.DiceLoss('multiclass', from_logits=True, ignore_index=ignore_index)
    return model, dice, torch.optim.Adam(model.parameters(), lr=2e-4)


def train_peer(cfg: dict, seed: int, device: torch.device, log, state_path: Path) -> tuple:
    """Train the peer on the config's data and budget: ([(iteration, val mIoU)] at its validation points,
    seconds spent). The training state at each log line and validation point is written to `state_path`
    (atomically) and continued from when a run of the same setting stopped after it; a stop signal
    (SIGTERM, Ctrl-C) writes it after the current step and ends with 128 + the signal's number, as
    train.py does."""
    torch.manual_seed(seed)
    data, train_cfg = cfg['data'], cfg['train']
    train_set, val_set = build_dataset(cfg, 'train'), build_dataset(cfg, 'val')
    augmented = Augmented(train_set, peer_augmentation(crop_size(cfg), data['ignore_index'], seed))
    val_loader = DataLoader(val_set, batch_size=1, num_workers=data['workers'], worker_init_fn=ignore_stop_signals)
    model, dice, optimizer = peer_training(data['num_classes'], data['ignore_index'], device)
    iterations, interval = train_cfg['max_iters'], train_cfg['val_interval']
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=1e-5)
    setting = json.dumps(peer_setting(cfg, seed), sort_keys=True)
    curve, iteration, seconds = [], 0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location='cpu', weights_only=True)
        if state['setting'] == setting:
            model.load_state_dict(state['model'])
            optimizer.load_state_dict(state['optimizer'])
            schedule.load_state_dict(state['schedule'])
            set_rng_state(state['rng'])
            curve, iteration, seconds = [tuple(point) for point in state['curve']], state['iteration'], state['seconds']
            log(f'peer: continuing from iteration {iteration} ({state_path})')
        else:
            log(f'peer: {state_path} was trained on another setting (data, budget, scoring or seed); starting afresh')

    def save_state() -> None:
        nonlocal seconds, start  # the time trained so far goes into the state
        now = time.perf_counter()
        seconds, start = seconds + now - start, now
        state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'schedule': schedule.state_dict()}
        state.update(setting=setting, rng=get_rng_state(), curve=curve, iteration=iteration, seconds=seconds)
        save_checkpoint(state, state_path)

    def stopped(number: int) -> None:
        log(f'peer: stopped by {signal.Signals(number).name} at iteration {iteration}; the state is in {state_path}')
        raise SystemExit(128 + number)

    start = time.perf_counter()
    with StopRequest() as stop:
        while iteration < iterations:
            stretch, done = divmod(iteration, interval)
            count = min(interval, iterations - stretch * interval)
            for images, labels in stretch_batches(augmented, cfg, seed, stretch, count, skip=done):
                images, labels = normalize(images.to(device), data['mean'], data['std']), labels.to(device)
                loss = dice(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                iteration += 1
                if iteration % train_cfg['log_interval'] == 0:
                    log(f'peer iter {iteration}/{iterations}: dice loss {loss.item():.4f}')
                    if iteration % interval:  # a validation point saves after scoring
                        save_state()
                if stop.received and iteration % interval:  # at a validation point: after scoring
                    save_state()
                    stopped(stop.received)
            scores = evaluate(model, val_loader, cfg, device, progress=False)
            model.train()
            curve.append((iteration, scores['mIoU']))
            save_state()
            log(f'peer iter {iteration}: mIoU {scores["mIoU"]:.2f}')
            if stop.received and iteration < iterations:
                stopped(stop.received)
    return curve, seconds


def peer_setting(cfg: dict, seed: int) -> dict:
    """Everything of the config and seed the peer's training and scoring read: its cache key."""
    data = {key: value for key, value in cfg['data'].items() if key not in ('train', 'workers')}
    train_cfg = {key: cfg['train'][key] for key in ('max_iters', 'batch_size', 'val_interval')}
    return {'data': data, 'crop': list(crop_size(cfg)), 'train': train_cfg, 'eval': cfg['eval'], 'seed': seed}


def peer_curve(cfg: dict, seed: int, device: torch.device, cache: Path) -> tuple:
    """(curve, seconds): from `cache` when it was trained on the same setting, else trained and cached."""
    setting = json.loads(json.dumps(peer_setting(cfg, seed)))  # tuples as lists, as read back
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved['setting'] == setting:
            print(f'peer: curve of {cache} reused (same data, budget, scoring and seed)', flush=True)
            return [tuple(point) for point in saved['curve']], saved['seconds']
    state = cache.with_name('peer_state.pth')
    curve, seconds = train_peer(cfg, seed, device, lambda line: print(line, flush=True), state)
    record = {'setting': setting, 'curve': curve, 'seconds': seconds}
    write_results(cache.parent, {cache.name: json.dumps(record, indent=2) + '\n'})
    state.unlink(missing_ok=True)
    return curve, seconds


# -------------------------------------------------------------------------------------------- ours


def our_curve(work_dir: Path) -> tuple:
    """([(iteration, val mIoU)], what was scored) of a train.py run, from its metrics.jsonl: the weights
    the recipe delivers, i.e. the moving average where the run kept one (train.ema_decay), else the
    model. The last value of each iteration counts, so a resumed run counts once."""
    if not (work_dir / METRICS_FILE).is_file():
        raise ConfigError(f'--ours {work_dir}: no {METRICS_FILE} there (a train.py run folder is expected)')
    averaged = validation_curve(work_dir, 'val_ema')
    points = averaged or validation_curve(work_dir)
    if not points:
        raise ConfigError(f'{work_dir / METRICS_FILE}: no validation yet')
    return sorted(points.items()), 'moving average of the weights' if averaged else 'weights'


# ------------------------------------------------------------------------------------------ report


def report(peer: list, ours: list, scored: str, seconds: dict) -> list:
    """Rows at the validation points both curves have: iteration, peer, ours, ours − peer, ours / peer."""
    ours_at = dict(ours)
    rows = [(i, p, ours_at[i], ours_at[i] - p, ours_at[i] / p if p else float('nan')) for i, p in peer if i in ours_at]
    print(f'this repo: val mIoU of the {scored}')
    print('| iteration | SMP FPN-ResNet18 (peer) | this repo | ours − peer | ours / peer |\n|---|---|---|---|---|')
    for iteration, p, o, difference, ratio in rows:
        print(f'| {iteration} | {p:.2f} | {o:.2f} | {difference:+.2f} | {ratio:.2f} |')
    times = [f'{name} {value / 60:.1f} min' for name, value in seconds.items() if value is not None]
    print('wall time: ' + ', '.join(times))
    return rows


def result_table(args, peer: list, ours_dir: Path, seconds: dict) -> tuple:
    """(columns, rows) of the camvid_peer result: a row per run and weights scored (the peer's; ours' moving
    average and raw weights where the run kept one: one run, one wall time), val mIoU at each point."""
    points = [iteration for iteration, _ in peer]
    ours = ' '.join([str(args.config), *args.set])
    curves = [("SMP's example", 'raw', dict(peer), seconds['peer'])]
    averaged = validation_curve(ours_dir, 'val_ema')
    if averaged:
        curves.append((ours, 'average', averaged, seconds['ours']))
    curves.append((ours, 'raw', validation_curve(ours_dir), seconds['ours']))
    columns = ['run', 'weights', *(f'iter {i}' for i in points), 'wall time (min)']
    rows = [
        [run, weights, *(curve.get(i) for i in points), round(s / 60) if s else None]
        for run, weights, curve, s in curves
    ]
    return columns, rows


def result_notes(args, cfg: dict, train_beside: bool) -> list:
    height, width = crop_size(cfg)
    train = cfg['train']
    if args.ours:
        how = f'Ours read from the run in {args.ours} (timed from its start to its last record), the peer trained here'
    elif train_beside:
        how = 'Side by side: ours as its own train.py process while the peer trained, a core each'
    else:
        how = 'Each run alone on the machine, one after the other (the peer, then ours)'
    return [
        f'Val mIoU (%) on whole val images; same data, budget ({train["max_iters"]} iterations x {train["batch_size"]} '
        f'crops of {height}x{width}, from random weights) and scoring for both.',
        "The peer is SMP's CamVid notebook (FPN on ResNet-18, SMP's Dice, Adam 2e-4 with cosine decay, its "
        f'albumentations augmentation), trained by benchmarks/peer_smp_camvid.py with seed {args.seed}.',
        f'{how}.',
        'Where ours keeps a moving average of its weights (train.ema_decay), that average is the model the recipe '
        'delivers (best_ema.pth) and the one compared; the raw weights are validated beside it in the same run.',
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    device = chosen_device(args.device)
    seconds = {}
    ours_dir = args.ours or args.out / 'ours'
    arguments = resumable_run(args.config, ours_dir, args.device, args.set)
    train_beside = args.side_by_side and args.ours is None
    with ThreadPoolExecutor(1) as beside:
        ours_trained = beside.submit(train_process, ours_dir, arguments) if train_beside else None
        peer, seconds['peer'] = peer_curve(cfg, args.seed, device, args.out / 'peer.json')
    if ours_trained is not None and not ours_trained.result():
        raise SystemExit(f'error: ours failed, see {ours_dir / "console.txt"}')
    if args.ours is None and not train_beside:
        start = time.perf_counter()
        train.main(arguments)
        seconds['ours'] = time.perf_counter() - start
    ours, scored = our_curve(ours_dir)
    seconds.setdefault('ours', run_seconds(ours_dir))
    rows = report(peer, ours, scored, seconds)
    result = {
        'config': args.config,
        'set': args.set,
        'peer': peer,
        'ours': ours,
        'ours_scored': scored,
        'ours_dir': str(ours_dir),
        'rows': rows,
        'seconds': seconds,
    }
    write_results(args.out, {'peer_smp_camvid.json': json.dumps(result, indent=2) + '\n'})
    if args.results:
        columns, rows = result_table(args, peer, ours_dir, seconds)
        notes = result_notes(args, cfg, train_beside)
        print('results:', write_result_table(args.results, 'camvid_peer', columns, rows, args.device, notes))
    return result


if __name__ == '__main__':
    run_cli(main)
