"""Train the skin segmenter on image/label folders and write a checkpoint plus a metrics JSON.

    python -m models.segmenter.train ../shared/data/skin/fasseg_frontal \\
        ../shared/data/skin/fasseg_multipose ../shared/data/skin/pratheepan --output runs/seg

Each folder holds ``images/`` plus ``labels/`` (FASSEG colour maps) or ``masks/`` (binary).
A seeded, subject-grouped share of every folder is held out for validation; the split is
written into the checkpoint config so ``models.segmenter.evaluate --split val`` scores the
same photos. The checkpoint kept is the epoch with the best validation IoU.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

from models import cli
from models.segmenter.metrics import counts, mean_scores, scores
from models.segmenter.model import Segmenter, SegmenterConfig, build_network
from models.segmenter.data import (BACKGROUND, HAIR, SKIN, Pair, add_folders_argument, assign_splits, discover,
                                    load_pair, load_regions, select, skin_ita)

log = logging.getLogger(__name__)

ITA_BIN_DEGREES = 15.0
LOSSES = ("bce_dice", "bce", "dice", "bce_lovasz")
_LOVASZ = smp.losses.LovaszLoss("binary", per_image=True)
# Soft Dice over the whole batch (smooth 1); it scores 0 on a batch with no skin at all.
_DICE = smp.losses.DiceLoss("binary", from_logits=True, smooth=1.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m models.segmenter.train",
                   "Train the skin segmenter (skin that acne can affect vs everything else).")
    add_folders_argument(p)
    p.add_argument("--output", type=Path, default=Path("runs/segmenter"),
                   help="checkpoint folder to write (weights.safetensors + config.json); overwritten")
    p.add_argument("--metrics-json", type=Path, default=None,
                   help="where to write per-epoch history and final validation metrics "
                        "(default: OUTPUT/train_metrics.json)")
    p.add_argument("--arch", default="Unet", help="segmentation-models-pytorch architecture (Unet, FPN, ...)")
    p.add_argument("--encoder", default="mobilenet_v2",
                   help="smp encoder name; trained from scratch, nothing is downloaded")
    p.add_argument("--decoder-channels", type=int, nargs="+", default=[64, 48, 32, 16, 16],
                   help="Unet/UnetPlusPlus decoder widths (five values); ignored by other architectures")
    p.add_argument("--decoder-attention", choices=("none", "scse"), default="none",
                   help="Unet/UnetPlusPlus decoder attention: scse adds spatial and channel squeeze-and-excitation "
                        "to every decoder block")
    p.add_argument("--input-size", type=int, default=192,
                   help="square network input in pixels (multiple of 32); images are resized to it")
    p.add_argument("--loss", choices=LOSSES, default="bce_dice",
                   help="training loss: binary cross-entropy, soft Dice, their sum, or BCE plus the per-image "
                        "Lovasz hinge (a surrogate of the per-image IoU that evaluation reports)")
    p.add_argument("--epochs", type=int, default=70, help="maximum number of epochs")
    p.add_argument("--steps-per-epoch", type=int, default=0,
                   help="optimiser steps per epoch (0: one pass over the training images)")
    p.add_argument("--batch-size", type=int, default=8, help="augmented crops per optimiser step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay, 1-epoch warm-up)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--patience", type=int, default=20,
                   help="stop after this many epochs without a better validation IoU (0: never stop early)")
    p.add_argument("--time-limit-min", type=float, default=40.0,
                   help="stop before starting an epoch that would end after this many minutes of training")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of each folder's photo groups (subjects) held out for validation")
    p.add_argument("--dataset-weight", action="append", default=[], metavar="NAME=W",
                   help="sample images of folder NAME W times as often (repeatable), e.g. pratheepan=2")
    p.add_argument("--cache-size", type=int, default=512,
                   help="decoded training images are kept in memory with their longer side at most this")
    cli.add_torch_args(p, threads=1, device=False)
    p.add_argument("--seed", type=int, default=0, help="seed for the split, sampling, augmentation and weights")
    p.add_argument("--fake-backgrounds", type=float, default=0.25,
                   help="probability that a FASSEG view's background becomes a smooth skin-toned backdrop "
                        "(otherwise half the time another training photo, else kept)")
    p.add_argument("--retone-skin", type=float, default=0.3, metavar="P",
                   help="probability that a training view's skin is given another tone (mostly darker)")
    p.add_argument("--tone-balance", type=float, default=0.5, metavar="POWER",
                   help="sample each image with weight (images of its skin tone in its set)^-POWER, tones "
                        "binned by ITA in 15-degree steps; 0 samples every image alike")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this segmenter checkpoint's weights (fine-tuning); its arch and encoder "
                        "must match the flags, and decoder tensors whose shape differs start fresh")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights, updated every step "
                        "with this decay (0: off; 0.995 averages over about 200 steps); it smooths the "
                        "epoch-to-epoch swings that heavy augmentation causes on a small validation split")
    p.add_argument("--plain-views", type=float, default=0.0, metavar="FRACTION",
                   help="share of training views left as the plain inference view (whole image resized, "
                        "mirrored half the time), so the network also fits the labels on undistorted photos")
    p.add_argument("--no-augment", action="store_true", help="train on plain resized images (for ablations)")
    args = p.parse_args(argv)
    if args.input_size % 32:
        p.error("--input-size must be a multiple of 32")
    if len(args.decoder_channels) != 5:
        p.error("--decoder-channels takes five values")
    if not 0.0 <= args.plain_views <= 1.0:
        p.error("--plain-views takes a fraction in [0, 1]")
    if not 0.0 <= args.ema < 1.0:
        p.error("--ema takes a decay in [0, 1)")
    return args


def _shrink(image: np.ndarray, mask: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    scale = max_side / max(image.shape[:2])
    if scale >= 1:
        return image, mask
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)


def _geometry(image: np.ndarray, regions: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random square view centred on the inference view (whole image squashed to size x size).

    It zooms in to a face part or out with padding (FFHQ faces fill more or less of the frame
    than FASSEG's), and varies aspect, rotation, shift and mirroring.
    """
    h, w = regions.shape
    zoom = math.exp(rng.uniform(math.log(0.5), math.log(1.5)))
    aspect = math.exp(rng.uniform(-0.25, 0.25))
    sx, sy = size / (w * zoom * aspect), size / (h * zoom / aspect)
    if rng.random() < 0.5:
        sx = -sx
    angle = math.radians(rng.uniform(-30, 30) if rng.random() < 0.7 else 0.0)
    cos, sin = math.cos(angle), math.sin(angle)
    shift = 0.5 * abs(1 - zoom) + 0.1
    cx, cy = w * (0.5 + rng.uniform(-shift, shift) / 2), h * (0.5 + rng.uniform(-shift, shift) / 2)
    lin = np.array([[cos * sx, -sin * sy], [sin * sx, cos * sy]])
    matrix = np.hstack([lin, (np.array([size / 2, size / 2]) - lin @ np.array([cx, cy]))[:, None]])
    if rng.random() < 0.5:
        border, value, fill = cv2.BORDER_REFLECT_101, (0, 0, 0), 0
    else:
        border, value, fill = cv2.BORDER_CONSTANT, tuple(int(v) for v in rng.integers(0, 256, 3)), BACKGROUND
    img = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=value)
    reg = cv2.warpAffine(regions, matrix, (size, size), flags=cv2.INTER_NEAREST, borderMode=border, borderValue=fill)
    return img, reg


def _recolour_hair(img: np.ndarray, hair: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dye the hair red, blond or grey: FASSEG hair is mostly dark, FFHQ's is every colour,
    and light or red hair is where colour alone confuses hair with skin."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0][hair], hsv[..., 1][hair], hsv[..., 2][hair]
    hsv[..., 0][hair] = (rng.uniform(0, 50) + 0.3 * (hue - hue.mean())) % 360.0
    hsv[..., 1][hair] = np.clip(sat * rng.uniform(0.2, 1.3) + rng.uniform(0, 0.3), 0, 1)
    hsv[..., 2][hair] = np.clip(val * rng.uniform(1.0, 3.0), 0, 1)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _skin_toned_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth, skin-coloured, non-skin backdrop (float RGB in [0, 1]).

    FFHQ backgrounds are often out-of-focus walls, wood or bricks in skin hues; these teach the
    network that skin colour without a face's shape and texture is not skin.
    """
    cells = int(rng.integers(2, 12))
    hsv = np.empty((cells, cells, 3), np.float32)
    hsv[..., 0] = (rng.uniform(0, 40) + rng.normal(0, 6, (cells, cells))) % 360.0
    hsv[..., 1] = np.clip(rng.uniform(0.15, 0.7) + rng.normal(0, 0.08, (cells, cells)), 0, 1)
    hsv[..., 2] = np.clip(rng.uniform(0.25, 0.95) + rng.normal(0, 0.12, (cells, cells)), 0, 1)
    field = cv2.cvtColor(cv2.resize(hsv, (size, size), interpolation=cv2.INTER_CUBIC), cv2.COLOR_HSV2RGB)
    return np.clip(field + rng.normal(0, rng.uniform(0.0, 0.04), field.shape).astype(np.float32), 0, 1)


def _retone_skin(img: np.ndarray, skin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give the labelled skin another tone, mostly darker: lightness scaled in CIELAB, a small
    red/yellow shift, and the edge feathered. The labelled sets hold few dark-skinned faces, and
    a filter that misses dark skin biases every dataset built with it."""
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    lab[..., 0] *= math.exp(rng.uniform(math.log(0.35), math.log(1.15)))
    lab[..., 1] += rng.uniform(-2, 5)
    lab[..., 2] += rng.uniform(-4, 8)
    toned = np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), 0, 1)
    alpha = cv2.GaussianBlur(skin.astype(np.float32), (0, 0), 1.5)[..., None]
    return img * (1 - alpha) + toned * alpha


def augment(image: np.ndarray, regions: np.ndarray, size: int, rng: np.random.Generator,
            donor: tuple[np.ndarray, np.ndarray] | None = None,
            fake_backgrounds: float = 0.25, retone: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One random training view and its 0/1 target.

    Geometry first; then, where the labels know them, the background is replaced (FASSEG's
    plain studio walls are nothing like FFHQ's scenes) by a view of another training photo with
    that photo's skin labels, or with probability ``fake_backgrounds`` by a skin-toned backdrop,
    and the hair is recoloured; with probability ``retone`` the skin takes another tone; then
    colour, exposure, blur, noise and JPEG artefacts.
    """
    img, reg = _geometry(image, regions, size, rng)
    target = (reg == SKIN).astype(np.uint8)
    out = img.astype(np.float32) / 255.0
    if target.any() and rng.random() < retone:
        out = _retone_skin(out, target, rng)
    background = reg == BACKGROUND
    choice = rng.random()
    if background.any() and (choice < fake_backgrounds or (donor is not None and choice < fake_backgrounds + 0.5)):
        if choice < fake_backgrounds:
            fill, fill_target = _skin_toned_field(size, rng), np.zeros_like(target)
        else:
            donor_img, donor_reg = _geometry(*donor, size, rng)
            fill, fill_target = donor_img.astype(np.float32) / 255.0, (donor_reg == SKIN).astype(np.uint8)
        alpha = cv2.GaussianBlur(background.astype(np.float32), (0, 0), 1.0)[..., None]
        out = out * (1 - alpha) + fill * alpha
        target = np.where(background, fill_target, target).astype(np.uint8)
    hair = reg == HAIR
    if hair.any() and rng.random() < 0.4:
        out = _recolour_hair(out, hair, rng)
    if rng.random() < 0.8:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-12, 12)) % 360.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.random() < 0.8:
        # Exposure and white balance: camera gain, per-channel tint, contrast and gamma.
        out = out * rng.uniform(0.55, 1.45) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
        mean = out.mean()
        out = (out - mean) * rng.uniform(0.6, 1.4) + mean
        out = np.clip(out, 0, 1) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.05:
        out = np.repeat(cv2.cvtColor(np.clip(out, 0, 1).astype(np.float32), cv2.COLOR_RGB2GRAY)[..., None], 3, 2)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 1.8))
    if rng.random() < 0.25:
        out = out + rng.normal(0, rng.uniform(0.005, 0.04), out.shape).astype(np.float32)
    img = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    if rng.random() < 0.4:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 96))])
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return img, target


def plain_view(image: np.ndarray, regions: np.ndarray, size: int,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The inference view: the whole image squashed to size x size, with its 0/1 target.

    Given a generator, the view is mirrored half the time (faces are near-symmetric).
    """
    img = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    target = (cv2.resize(regions, (size, size), interpolation=cv2.INTER_NEAREST) == SKIN).astype(np.uint8)
    if rng is not None and rng.random() < 0.5:
        img, target = img[:, ::-1].copy(), target[:, ::-1].copy()
    return img, target


def training_view(sample: tuple[np.ndarray, np.ndarray], donor: tuple[np.ndarray, np.ndarray],
                  args: argparse.Namespace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One view for a training step: augmented, or plain as ``--no-augment``/``--plain-views`` ask."""
    if args.no_augment:
        return plain_view(*sample, args.input_size)
    if args.plain_views and rng.random() < args.plain_views:
        return plain_view(*sample, args.input_size, rng)
    return augment(*sample, args.input_size, rng, donor, args.fake_backgrounds, args.retone_skin)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """BCE, soft Dice over the batch, their sum, or BCE plus the per-image Lovasz hinge."""
    total = logits.new_zeros(())
    if kind in ("bce", "bce_dice", "bce_lovasz"):
        total = total + F.binary_cross_entropy_with_logits(logits, target)
    if kind in ("dice", "bce_dice"):
        total = total + _DICE(logits, target)
    if kind == "bce_lovasz":
        total = total + _LOVASZ(logits, target)
    return total


def validate(segmenter: Segmenter, val: Sequence[tuple[Pair, np.ndarray, np.ndarray]], batch: int = 8) -> dict[str, dict[str, float]]:
    """Mean per-image scores per dataset at full resolution, plus their macro mean."""
    per_dataset: dict[str, list[dict[str, float]]] = {}
    segmenter.network.eval()
    for start in range(0, len(val), batch):
        chunk = val[start:start + batch]
        preds = segmenter.predict_masks([im for _, im, _ in chunk])
        for (pair, _, truth), pred in zip(chunk, preds):
            per_dataset.setdefault(pair.dataset, []).append(scores(*counts(pred, truth)))
    out = {name: dict(mean_scores(rows), images=len(rows)) for name, rows in sorted(per_dataset.items())}
    if out:
        out["macro"] = {m: float(np.mean([v[m] for v in out.values()])) for m in ("iou", "dice", "precision", "recall")}
    return out


def tone_weights(pairs: Sequence[Pair], data: Sequence[tuple[np.ndarray, np.ndarray]], power: float) -> np.ndarray:
    """Per-image sampling weights that lift rare skin tones: (count of its ITA bin in its set)^-power,
    scaled to mean 1 within each set so the per-set weights keep their meaning."""
    ita = np.array([skin_ita(image, regions == SKIN) for image, regions in data])
    bins = np.where(np.isnan(ita), -1, np.floor(np.nan_to_num(ita) / ITA_BIN_DEGREES)).astype(int)
    sets = np.array([p.dataset for p in pairs])
    out = np.ones(len(pairs))
    for name in set(sets):
        mine = sets == name
        _, inverse, sizes = np.unique(bins[mine], return_inverse=True, return_counts=True)
        w = sizes[inverse].astype(float) ** -power
        out[mine] = w / w.mean()
    return out


def init_from(network: torch.nn.Module, source: torch.nn.Module) -> list[str]:
    """Copy every tensor of ``source`` whose name and shape match; return the names left fresh.

    This lets a wider decoder, or one with attention, start from a trained encoder.
    """
    theirs = source.state_dict()
    ours = network.state_dict()
    matched = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    network.load_state_dict(matched, strict=False)
    return sorted(k for k in ours if k not in matched and not k.endswith("num_batches_tracked"))


def _dataset_weights(specs: Sequence[str]) -> dict[str, float]:
    weights = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise SystemExit(f"--dataset-weight expects NAME=W, got {spec!r}")
        weights[name] = float(value)
    return weights


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run one training; return the metrics that were written to the metrics JSON."""
    cli.set_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)

    pairs = [p for folder in args.data for p in discover(folder)]
    names = [p.dataset for p in pairs]
    if len(set(names)) != len({str(Path(f).resolve()) for f in args.data}):
        raise SystemExit("two data folders share a folder name; names identify datasets in the split")
    val_groups = assign_splits(pairs, args.val_fraction, args.seed)
    train_pairs, val_pairs = select(pairs, val_groups, False), select(pairs, val_groups, True)
    for name in sorted(set(names)):
        log.info("%s: %d train / %d validation images (%s labels)", name,
                 sum(p.dataset == name for p in train_pairs), sum(p.dataset == name for p in val_pairs),
                 next(p.kind for p in pairs if p.dataset == name))
    if not train_pairs:
        raise SystemExit("no training images left after the validation split")

    t0 = time.time()
    train_data = [_shrink(*load_regions(p), args.cache_size) for p in train_pairs]
    val_data = [(p, *load_pair(p)) for p in val_pairs]
    log.info("decoded %d images in %.1fs", len(pairs), time.time() - t0)

    weights = _dataset_weights(args.dataset_weight)
    sample_p = np.array([weights.get(p.dataset, 1.0) for p in train_pairs])
    sample_p = sample_p * tone_weights(train_pairs, train_data, args.tone_balance)
    sample_p = sample_p / sample_p.sum()

    kwargs: dict[str, Any] = {}
    if args.arch.lower().startswith("unet"):
        kwargs["decoder_channels"] = list(args.decoder_channels)
        if args.decoder_attention != "none":
            kwargs["decoder_attention_type"] = args.decoder_attention
    cfg = SegmenterConfig(arch=args.arch, encoder=args.encoder, input_size=args.input_size, model_kwargs=kwargs)
    network = build_network(cfg)
    if args.init:
        start_from = Segmenter.load(args.init)
        if (start_from.cfg.arch, start_from.cfg.encoder) != (cfg.arch, cfg.encoder):
            raise SystemExit(f"--init {args.init} is a {start_from.cfg.arch}/{start_from.cfg.encoder}; "
                             f"the flags ask for {cfg.arch}/{cfg.encoder}")
        fresh = init_from(network, start_from.network)
        log.info("starting from %s (sha256 %s)%s", args.init, start_from.sha256[:12],
                 f"; {len(fresh)} tensors start fresh, their shape differs or they are new "
                 f"({', '.join(sorted({k.rsplit('.', 2)[0] for k in fresh}))})" if fresh else "")
    # The averaged copy shares the config; it is what gets validated and saved when --ema is on.
    averaged = (torch.optim.swa_utils.AveragedModel(
        network, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True)
        if args.ema else None)
    segmenter = Segmenter(averaged.module if averaged else network, cfg)
    params = sum(p.numel() for p in network.parameters())
    log.info("%s/%s, %.2fM parameters, input %d", args.arch, args.encoder, params / 1e6, args.input_size)

    steps = args.steps_per_epoch or max(1, math.ceil(len(train_pairs) / args.batch_size))
    total_steps = steps * args.epochs
    opt = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Linear warm-up over the first epoch, from lr/steps to lr, then cosine decay to 0 at the last step.
    sched = CosineLRScheduler(opt, t_initial=total_steps, lr_min=0.0, warmup_t=steps - 1, warmup_lr_init=args.lr / steps,
                              warmup_prefix=False, t_in_epochs=False)
    step = 0
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255

    metrics_path = args.metrics_json or args.output / "train_metrics.json"
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "val": {}, "iou": -1.0}
    split_info = {"val_fraction": args.val_fraction, "seed": args.seed, "val_groups": val_groups,
                  "val_images": {n: sorted(p.name for p in val_pairs if p.dataset == n) for n in sorted(set(names))}}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "data"}
    settings["data"] = [Path(f).name for f in args.data]
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.time()
        network.train()
        losses = []
        for _ in range(steps):
            idx = rng.choice(len(train_data), size=args.batch_size, p=sample_p)
            views = [training_view(train_data[i], train_data[rng.integers(len(train_data))], args, rng) for i in idx]
            x = torch.from_numpy(np.stack([v[0] for v in views])).permute(0, 3, 1, 2).float()
            y = torch.from_numpy(np.stack([v[1] for v in views])).float().unsqueeze(1)
            loss = loss_fn(network((x - mean) / std), y, args.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            if averaged:
                averaged.update_parameters(network)
            losses.append(loss.item())
        val = validate(segmenter, val_data) if val_data else {}
        iou = val.get("macro", {}).get("iou", -float(np.mean(losses)))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.time() - epoch_start, 1), "val": val}
        history.append(row)
        improved = iou > best["iou"]
        if improved:
            best = {"epoch": epoch, "val": val, "iou": iou}
            training = {"settings": settings, "split": split_info, "best_epoch": epoch, "val_metrics": val,
                        "parameters": params, "torch": torch.__version__}
            segmenter.save(str(args.output), training=training)
        log.info("epoch %d/%d loss %.4f val %s%s (%.0fs)", epoch, args.epochs, row["train_loss"],
                 " ".join(f"{k}={v['iou']:.4f}" for k, v in val.items()), " *best" if improved else "",
                 row["seconds"])
        elapsed = time.time() - start
        if args.patience and epoch - best["epoch"] >= args.patience:
            log.info("early stop: no better validation IoU for %d epochs", args.patience)
            break
        if elapsed + elapsed / epoch > args.time_limit_min * 60:
            log.info("time limit: %.1f min used, next epoch would pass %.0f min", elapsed / 60, args.time_limit_min)
            break
    result = {"checkpoint": str(args.output), "best_epoch": best["epoch"], "best_val": best["val"],
              "epochs_run": len(history), "train_minutes": round((time.time() - start) / 60, 2),
              "parameters": params, "settings": settings, "split": split_info, "history": history}
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("best epoch %d, validation %s; wrote %s and %s", best["epoch"],
             {k: round(v["iou"], 4) for k, v in best["val"].items()}, args.output, metrics_path)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    train(parse_args(argv))


if __name__ == "__main__":
    main()
