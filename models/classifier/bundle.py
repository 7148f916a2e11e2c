"""Give a classifier a second network that grades the severity of the faces it calls acne.

    python -m models.classifier.bundle CLASSIFIER SEVERITY --output OUT

The verdict, the acne probability and the lesion count stay CLASSIFIER's. The severity of
each acne face comes from SEVERITY's own lesion count and grade outputs on the same patches,
through SEVERITY's severity curve. That costs one more forward pass per acne face and none
per clear face. A network trained to call clear faces clear counts dense acne less
precisely than one trained for grades, and this is how both can be kept (the shipped model
card has the figures).

OUT holds CLASSIFIER's network, with a config that pins SEVERITY's sha256, and SEVERITY
itself in ``OUT/severity/``. OUT's sha256 therefore names both networks.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import replace
from typing import Sequence

from models import cli
from models.checkpoint import CheckpointError
from models.classifier.model import SEVERITY_FOLDER, Classifier, severity_mismatch

log = logging.getLogger("models.classifier.bundle")


def bundle(classifier: str, severity: str, output: str) -> str:
    """Write ``output``: ``classifier``'s network grading acne faces with ``severity``'s; return its sha256."""
    clf = Classifier.load(classifier)
    grader = Classifier.load(severity)
    if grader.severity_model is not None:
        raise CheckpointError(f"{severity} carries a severity network of its own; pass the network itself "
                              f"(its {SEVERITY_FOLDER}/ folder), severity networks do not nest")
    problems = severity_mismatch(clf.cfg, grader.cfg)
    if problems:
        raise CheckpointError(f"{severity} cannot grade the faces of {classifier}: it has " + "; ".join(problems))
    if clf.severity_model is not None:
        log.info("%s already had a severity network (%s); it is replaced", classifier,
                 clf.cfg.severity_network_sha256[:12])
    pinned = grader.save(output.rstrip("/") + "/" + SEVERITY_FOLDER)
    return Classifier(clf.network, replace(clf.cfg, severity_network_sha256=pinned)).save(output)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    p = cli.parser("python -m models.classifier.bundle", __doc__.split("\n\n")[0],
                   epilog="Both must cut the same patches (patch size, least skin), at the same input size, "
                          "with the same grades. A --init from OUT trains CLASSIFIER's network alone: bundle again.")
    p.add_argument("classifier", help="the checkpoint that gives the verdict (local path or fsspec URL)")
    p.add_argument("severity", help="the checkpoint whose count and grade outputs grade the acne faces")
    p.add_argument("--output", required=True, help="checkpoint folder to write (local path or fsspec URL)")
    args = p.parse_args(argv)
    sha = bundle(args.classifier, args.severity, args.output)
    log.info("wrote %s (sha256 %s)", args.output, sha[:12])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
