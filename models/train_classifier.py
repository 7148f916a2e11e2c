"""Train the acne classifier on a build_dataset patch dataset.

    python -m models.train_classifier DATASET --output CHECKPOINT_DIR [options]

Trains on the ``train`` split, picks the epoch and the face aggregation on ``validation``
(per-face macro-F1 by default), and writes the checkpoint plus a metrics JSON. Labels can be
binary or graded; ``--label-map "0,1->0;2,3->1"`` regroups them. When the dataset carries
``lesion_count`` per patch, the network also learns each patch's lesion count (Poisson
loss), and the ``evidence`` aggregation grades a face by its total predicted lesions.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint
from models.classification_metrics import classification_report
from models.classifier import (
    AGGREGATIONS,
    KIND,
    Classifier,
    ClassifierConfig,
    build_network,
    evidence_temperature,
)
from models.dataset import read_manifest
from models.patch_data import (
    PatchSet,
    check_splits_disjoint,
    load_patch_set,
    map_labels,
    order_classes,
    parse_label_map,
)

log = logging.getLogger("train_classifier")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.train_classifier",
        description=__doc__.split("\n\n")[0] + " Face metrics are computed by aggregating patch outputs per face.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", help="build_dataset output (local path or fsspec URL) with patches/{train,validation}")
    p.add_argument("--output", required=True, help="checkpoint folder to write (local path or fsspec URL)")
    p.add_argument("--metrics", default=None, help="metrics JSON to write; default: <output>/metrics.json")
    p.add_argument("--arch", default="mobilenetv3_small_100", help="timm model name (built with random weights)")
    p.add_argument("--input-size", type=int, default=96, help="patches are resized (INTER_AREA) to this square size")
    p.add_argument("--epochs", type=int, default=15, help="training epochs; 0 only fits the aggregation (with --init)")
    p.add_argument("--batch-size", type=int, default=64, help="patches per optimisation step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (one-cycle schedule)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation")
    p.add_argument(
        "--label-map",
        default="",
        help="regroup dataset labels, e.g. '0,1->0;2,3->1' (groups separated by ';'); every label must be mapped",
    )
    p.add_argument(
        "--classes",
        default="",
        help="comma-separated class order, least to most severe; default: the (mapped) labels in the data, "
        "numerically sorted when numeric",
    )
    p.add_argument(
        "--lesion-target",
        choices=("auto", "on", "off"),
        default="auto",
        help="also learn each patch's lesion_count; auto = on when every training patch has one",
    )
    p.add_argument("--count-weight", type=float, default=1.0, help="weight of the lesion-count loss")
    p.add_argument("--label-weight", type=float, default=1.0, help="weight of the patch label loss")
    p.add_argument(
        "--aggregation",
        choices=("auto", *AGGREGATIONS),
        default="auto",
        help="how patch outputs become a face decision; auto = the best on validation "
        "(evidence needs the lesion target)",
    )
    p.add_argument("--topk", type=int, default=3, help="patches averaged by the topk aggregation")
    p.add_argument(
        "--select-metric", choices=("macro_f1", "accuracy"), default="macro_f1", help="validation metric for selection"
    )
    p.add_argument(
        "--balance",
        choices=("faces", "none"),
        default="faces",
        help="class imbalance: 'faces' weighs every class equally (inverse face frequency) in the loss and "
        "the evidence fit",
    )
    p.add_argument(
        "--max-patches-per-face", type=int, default=0, help="random patches per face per epoch (0 = all); speeds up"
    )
    p.add_argument(
        "--calibration-faces",
        type=int,
        default=300,
        help="train faces the per-epoch evidence fit uses (0 = all); the selected epoch is refitted on all",
    )
    p.add_argument(
        "--init",
        default=None,
        help="classifier checkpoint to start from (same arch). With another class set the class logits restart "
        "but the lesion-count output is kept, so '--init CKPT --epochs 0 --label-map ...' refits only the "
        "evidence aggregation for new labels",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return p.parse_args(argv)


def _labels_to_index(labels: Sequence[str | None], classes: Sequence[str], split: str) -> np.ndarray:
    unknown = sorted({lab for lab in labels if lab is not None and lab not in classes})
    if unknown:
        raise ValueError(f"{split} labels {unknown} are not among the classes {list(classes)}; fix --classes")
    return np.array([-1 if lab is None else classes.index(lab) for lab in labels], np.int64)


def _augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips, 90° turns and mild brightness/contrast jitter on a float (B,3,S,S) 0..255 batch."""
    b = batch.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    batch = torch.rot90(batch, int(torch.randint(4, (1,), generator=gen)), dims=(2, 3))
    gain = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 20.0
    return (batch * gain + shift).clamp(0, 255)


def fit_evidence(totals: np.ndarray, y: np.ndarray, n_classes: int, class_weight: np.ndarray) -> tuple[list, list]:
    """Multinomial logistic regression of face class on total lesions: slopes and biases per class."""
    scale = max(float(np.median(totals)), 1.0)
    x = torch.tensor(totals / scale, dtype=torch.float64)
    target = torch.tensor(y)
    w = torch.tensor(class_weight[y], dtype=torch.float64)
    a = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x[:, None] * a[None] + b[None]
        loss = (F.cross_entropy(logits, target, reduction="none") * w).sum() / w.sum() + 1e-4 * (a**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (a.detach().numpy() / scale).tolist(), b.detach().numpy().tolist()


class Trainer:
    """Holds the data, network and the per-epoch evaluation of every aggregation."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        mapping = parse_label_map(args.label_map)
        check_splits_disjoint(args.dataset)
        self.manifest = read_manifest(args.dataset)
        log.info("decoding patches of %s at %dpx", args.dataset, args.input_size)
        self.train = load_patch_set(args.dataset, "train", args.input_size)
        self.val = load_patch_set(args.dataset, "validation", args.input_size)
        if not len(self.train) or not len(self.val):
            raise ValueError(
                f"{args.dataset} needs patches in both train ({len(self.train)}) and validation ({len(self.val)})"
            )
        train_labels = map_labels(self.train.face_labels, mapping)
        val_labels = map_labels(self.val.face_labels, mapping)
        classes = (
            tuple(c.strip() for c in args.classes.split(",") if c.strip())
            if args.classes
            else order_classes([lab for lab in train_labels + val_labels if lab is not None])
        )
        self.y_train = _labels_to_index(train_labels, classes, "train")
        self.y_val = _labels_to_index(val_labels, classes, "validation")
        if len(set(self.y_train[self.y_train >= 0].tolist())) < 2:
            raise ValueError(f"the train split needs faces of at least two classes; it has {sorted(set(train_labels))}")
        train_lesions_known = not np.isnan(self.train.lesions).any()
        if args.lesion_target == "on" and not train_lesions_known:
            raise ValueError("--lesion-target on, but some training patches have no lesion_count")
        self.use_count = args.lesion_target == "on" or (args.lesion_target == "auto" and train_lesions_known)
        if args.aggregation == "evidence" and not self.use_count:
            raise ValueError("--aggregation evidence needs the lesion target (lesion_count in the data)")
        counts = np.bincount(self.y_train[self.y_train >= 0], minlength=len(classes)).astype(np.float64)
        self.class_weight = (
            np.where(counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0)
            if args.balance == "faces"
            else np.ones(len(classes))
        )
        sizes = np.unique(self.train.boxes[:, 2])
        self.cfg = ClassifierConfig(
            classes=classes,
            arch=args.arch,
            input_size=args.input_size,
            patch_size=int(sizes[0]) if len(sizes) == 1 else 0,
            min_patch_skin=float(self.manifest.get("arguments", {}).get("min_patch_skin") or 0.0),
            count_output=self.use_count,
            topk=args.topk,
            label_map=mapping,
        )
        torch.manual_seed(args.seed)
        self.network = build_network(self.cfg)
        self.label_head_reset = False
        if self.use_count:
            self._init_count_output()
        if args.init:
            self._warm_start(args.init)
        self.device = torch.device(args.device)
        self.network.to(self.device)
        log.info(
            "classes %s; train %d faces / %d patches, validation %d faces / %d patches; lesion target %s; "
            "class weights %s",
            list(classes),
            int((self.y_train >= 0).sum()),
            len(self.train),
            int((self.y_val >= 0).sum()),
            len(self.val),
            "on" if self.use_count else "off",
            np.round(self.class_weight, 3).tolist(),
        )

    def _warm_start(self, uri: str) -> None:
        ckpt = load_checkpoint(uri, KIND)
        for key, wanted in (("arch", self.cfg.arch), ("input_size", self.cfg.input_size)):
            if ckpt.config.get(key) != wanted:
                raise ValueError(
                    f"--init {uri} has {key} {ckpt.config.get(key)!r} but this run uses {wanted!r}; "
                    f"pass --{key.replace('_', '-')} {ckpt.config.get(key)}"
                )
        own = self.network.state_dict()
        fitting = {k: v for k, v in ckpt.state_dict.items() if k in own and own[k].shape == v.shape}
        head = next(name for name, mod in self.network.named_modules() if mod is self.network.get_classifier())
        head_keys = [f"{head}.weight", f"{head}.bias"]
        self.label_head_reset = any(k not in fitting for k in head_keys)
        if self.label_head_reset and self.use_count and ckpt.config.get("count_output"):
            # Another class set resets the class logits, but the lesion-count row (the last) carries over.
            for k in head_keys:
                if k in ckpt.state_dict and k in own:
                    merged = own[k].clone()
                    merged[-1] = ckpt.state_dict[k][-1]
                    fitting[k] = merged
        self.network.load_state_dict(fitting, strict=False)
        log.info(
            "warm start from %s: %d of %d tensors reused%s",
            uri,
            len(fitting),
            len(own),
            "; class logits reset" if self.label_head_reset else "",
        )

    def _train_epoch(self, opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator, rng: np.random.Generator) -> float:
        args, data, net = self.args, self.train, self.network
        patch_label = self.y_train[data.face]
        usable = np.nonzero((patch_label >= 0) | self.use_count)[0]
        if args.max_patches_per_face > 0:
            by_face = [rng.permutation(idx)[: args.max_patches_per_face] for idx in data.face_patches()]
            usable = np.intersect1d(np.concatenate(by_face), usable)
        order = rng.permutation(usable)
        mean = torch.tensor(self.cfg.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.cfg.std).view(1, 3, 1, 1) * 255
        weights = torch.tensor(self.class_weight, dtype=torch.float32)
        n_classes = len(self.cfg.classes)
        net.train()
        total, seen = 0.0, 0
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            if len(idx) < 2:
                continue
            x = torch.from_numpy(data.pixels[idx]).permute(0, 3, 1, 2).float()
            x = ((_augment(x, gen) - mean) / std).to(self.device)
            out = net(x)
            labels = torch.from_numpy(patch_label[idx])
            loss = torch.zeros((), device=self.device)
            has_label = labels >= 0
            if has_label.any() and args.label_weight > 0:
                lab = labels[has_label]
                ce = F.cross_entropy(out[has_label.to(self.device), :n_classes], lab.to(self.device), reduction="none")
                w = weights[lab].to(self.device)
                loss = loss + args.label_weight * (ce * w).sum() / w.sum()
            if self.use_count:
                target = torch.from_numpy(data.lesions[idx]).to(self.device)
                loss = loss + args.count_weight * F.poisson_nll_loss(out[:, n_classes], target, log_input=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        return total / max(seen, 1)

    def _outputs(self, data: PatchSet, rows: np.ndarray | None = None) -> np.ndarray:
        clf = Classifier(self.network, self.cfg, device=str(self.device))
        pixels = data.pixels if rows is None else data.pixels[rows]
        outputs = clf.forward_patches(list(pixels))
        self.network.train()
        return outputs

    def _init_count_output(self) -> None:
        # Starting the log-rate at the mean lesions per patch keeps the first Poisson losses sane.
        head = self.network.get_classifier()
        rate = max(float(np.nanmean(self.train.lesions)), 1e-3)
        with torch.no_grad():
            head.weight[len(self.cfg.classes)].mul_(0.01)
            head.bias[len(self.cfg.classes)] = math.log(rate)

    def evaluate(self, calibration_faces: int) -> dict[str, Any]:
        """Validation face metrics for every applicable aggregation.

        The evidence aggregation is fitted on ``calibration_faces`` train faces (0 = all).
        """
        val_out = self._outputs(self.val)
        candidates: dict[str, ClassifierConfig] = {}
        if self.args.label_weight > 0 and not (self.label_head_reset and self.args.epochs == 0):
            for agg in ("mean", "geomean", "topk"):
                candidates[agg] = replace(self.cfg, aggregation=agg)
        result: dict[str, Any] = {}
        if self.use_count:
            faces = np.nonzero(self.y_train >= 0)[0]
            if calibration_faces > 0:
                faces = np.sort(np.random.default_rng(self.args.seed).permutation(faces)[:calibration_faces])
            by_face = self.train.face_patches()
            groups = [by_face[f] for f in faces]
            train_out = self._outputs(self.train, np.concatenate(groups))
            probe = Classifier(self.network, self.cfg)
            bounds = np.cumsum([0] + [len(g) for g in groups])
            train_totals = np.array(
                [probe.counts_from_outputs(train_out[bounds[i] : bounds[i + 1]]).sum() for i in range(len(groups))]
            )
            slopes, bias = fit_evidence(train_totals, self.y_train[faces], len(self.cfg.classes), self.class_weight)
            candidates["evidence"] = replace(
                self.cfg,
                patch_output="count",
                aggregation="evidence",
                evidence_slopes=tuple(slopes),
                evidence_bias=tuple(bias),
                evidence_temperature=evidence_temperature(slopes),
            )
            val_totals = np.array([probe.counts_from_outputs(val_out[idx]).sum() for idx in self.val.face_patches()])
            val_true = np.array([np.nansum(self.val.lesions[idx]) for idx in self.val.face_patches()])
            if not np.isnan(self.val.lesions).all():
                result["val_face_lesion_mae"] = float(np.abs(val_totals - val_true).mean())
        if self.args.aggregation != "auto":
            candidates = {k: v for k, v in candidates.items() if k == self.args.aggregation}
        keep = self.y_val >= 0
        result["aggregations"] = {}
        for name, cfg in candidates.items():
            clf = Classifier(self.network, cfg)
            probs = clf.probs_from_outputs(val_out)
            faces = np.stack([clf.aggregate(probs[idx]) for idx in self.val.face_patches()])
            report = classification_report(self.y_val[keep], faces[keep].argmax(1), cfg.classes)
            result["aggregations"][name] = {"config": cfg, "report": report}
        self.network.train()
        return result

    def run(self, on_improved: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """Train, evaluate every epoch, keep the best; ``on_improved`` gets the outcome so far."""
        args = self.args
        gen = torch.Generator().manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        opt = torch.optim.AdamW(self.network.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        per_epoch = len(self.train) if args.max_patches_per_face <= 0 else args.max_patches_per_face * len(self.train.face_ids)
        steps = max(1, args.epochs * math.ceil(per_epoch / args.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps + 1, pct_start=0.15)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        for epoch in range(0 if args.epochs == 0 else 1, args.epochs + 1):
            started = time.time()
            loss = self._train_epoch(opt, sched, gen, rng) if epoch > 0 else float("nan")
            train_s = time.time() - started
            ev = self.evaluate(args.calibration_faces)
            row = {"epoch": epoch, "loss": loss, "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - started - train_s, 1)}
            if "val_face_lesion_mae" in ev:
                row["val_face_lesion_mae"] = round(ev["val_face_lesion_mae"], 3)
            row["validation"] = {
                name: {k: round(c["report"][k], 4) for k in ("accuracy", "macro_f1")} for name, c in ev["aggregations"].items()
            }
            history.append(row)
            log.info("epoch %s", json.dumps(row))
            improved = False
            for name, cand in ev["aggregations"].items():
                score = cand["report"][args.select_metric]
                if best is None or score > best["score"]:
                    improved = True
                    best = {
                        "score": score,
                        "epoch": epoch,
                        "aggregation": name,
                        "config": cand["config"],
                        "report": cand["report"],
                        "state": copy.deepcopy(self.network.state_dict()),
                        "all": {n: c["report"] for n, c in ev["aggregations"].items()},
                    }
            if improved and on_improved is not None and epoch < args.epochs:
                on_improved({"history": history, "best": best})
        assert best is not None
        if best["aggregation"] == "evidence" and args.calibration_faces > 0:
            # The per-epoch fit used a subset of train faces; refit the winner on all of them.
            self.network.load_state_dict(best["state"])
            final = self.evaluate(0)["aggregations"]
            best.update(
                config=final["evidence"]["config"],
                report=final["evidence"]["report"],
                all={n: c["report"] for n, c in final.items()},
            )
            log.info("evidence refit on all train faces: validation %s", json.dumps(
                {k: round(best["report"][k], 4) for k in ("accuracy", "macro_f1")}))
        return {"history": history, "best": best}


def write_outputs(trainer: Trainer, outcome: dict[str, Any], started: float, complete: bool) -> str:
    """Write the best checkpoint so far and the metrics JSON; return the checkpoint sha256.

    Called after every improving epoch too, so a run stopped early still leaves its best model.
    """
    args, best = trainer.args, outcome["best"]
    training = {
        "dataset": args.dataset,
        "dataset_manifest": trainer.manifest,
        "args": vars(args),
        "best_epoch": best["epoch"],
        "complete": complete,
        "selected_on": f"validation {args.select_metric}",
        "validation": {k: best["report"][k] for k in ("accuracy", "macro_f1", "faces")},
        "seconds": round(time.time() - started, 1),
    }
    network = build_network(best["config"])
    network.load_state_dict(best["state"])
    sha = Classifier(network, best["config"]).save(args.output, training=training)
    metrics = {
        "checkpoint": args.output,
        "checkpoint_sha256": sha,
        "complete": complete,
        "classes": list(best["config"].classes),
        "best_epoch": best["epoch"],
        "aggregation": best["aggregation"],
        "selected_on": training["selected_on"],
        "validation": best["report"],
        "validation_by_aggregation": best["all"],
        "history": outcome["history"],
        "config": {k: v for k, v in asdict(best["config"]).items() if k != "training"},
        "seconds": training["seconds"],
    }
    with fsspec.open(args.metrics or args.output.rstrip("/") + "/metrics.json", "wt") as f:
        json.dump(metrics, f, indent=2, default=str)
        f.write("\n")
    return sha


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    started = time.time()
    trainer = Trainer(args)
    outcome = trainer.run(lambda partial: write_outputs(trainer, partial, started, complete=False))
    best = outcome["best"]
    sha = write_outputs(trainer, outcome, started, complete=True)
    log.info(
        "best epoch %d, aggregation %s: validation accuracy %.4f, macro-F1 %.4f; checkpoint %s (sha256 %s)",
        best["epoch"],
        best["aggregation"],
        best["report"]["accuracy"],
        best["report"]["macro_f1"],
        args.output,
        sha[:12],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
