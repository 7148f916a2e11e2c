"""The jobs' flags, each defined exactly once, in groups.

A public ``add_*_flags`` function adds each group to a parser; both jobs list the groups
they take, and ``job_parser`` builds their parser from those functions. ``AcneOptions`` is
the same flags as one Beam ``PipelineOptions`` subclass (its ``_add_argparse_args`` override
is Beam's documented hook), so Beam knows them too, e.g. for ``view_as(AcneOptions)``.
Anything that is not one of these flags must be a Beam flag (``--runner``, ``--direct_num_workers``,
``--project``...) and goes to Beam untouched. A flag that neither the job nor Beam knows stops the
job before any work: Beam would only log a warning and run with the default.
"""
from __future__ import annotations

import argparse
import difflib
import weakref
from typing import Callable, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from models import defaults
from transforms.decode import DEFAULT_MAX_PIXELS
from transforms.patches import FORMATS
from transforms.plan import DEFAULT_MAX_IMAGE_BYTES
from transforms.resolution import MIN_WORKING_SIDE
from transforms.classify import BATCH_PATCHES
from transforms.segment import BATCH_SIZES
from transforms.split import MODES

DEFAULT_PATCH_SIZE = 256
DEFAULT_MIN_PATCH_SKIN = 0.5
DEFAULT_MIN_FACE_SKIN = 0.15
# score judges any face with some skin: a face that fills little of its photo (a distant or
# small face on a wide canvas) still has lesions to count, and a verdict is what users ask for.
SCORE_MIN_FACE_SKIN = 0.02

# Adds one group of job flags to a parser; each job lists the groups it takes.
FlagGroup = Callable[[argparse.ArgumentParser], None]

# The --help sections, in the order a job runs its stages: each flag group adds to one of them.
SECTIONS = {
    "input": "What to read, and what travels with each image.",
    "segmentation": "The skin segmenter and how it runs.",
    "patches": "Which faces are kept and how they are tiled.",
    "scoring": "The acne classifier and what it reports.",
    "output": "Where and how the results are written.",
}
_sections: weakref.WeakKeyDictionary[argparse.ArgumentParser, dict[str, argparse._ArgumentGroup]] = (
    weakref.WeakKeyDictionary()
)

BEAM_EPILOG = """\
Beam flags:
  Any other flag goes to Beam untouched, for example:
  --runner DirectRunner            (the default here) or DataflowRunner, PortableRunner, ...
  --direct_num_workers 2 --direct_running_mode multi_processing
  --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py   (Dataflow)
  Inputs and outputs may be local paths or any fsspec URL: gs://, s3://, memory://, ...
"""


def section(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's --help section ``title``, made on first use, so that several flag groups can share one."""
    groups = _sections.setdefault(parser, {})
    if title not in groups:
        groups[title] = parser.add_argument_group(title, SECTIONS[title])
    return groups[title]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def _open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability strictly between 0 and 1")
    return value


def _by_device(sizes: dict[str, int]) -> str:
    """A default that follows --device, as --help states it: '2 on cpu, 32 on cuda'."""
    return ", ".join(f"{n} on {device}" for device, n in sizes.items())


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """Where images come from, and what travels with them."""
    g = section(parser, "input")
    g.add_argument("--input", nargs="+", default=None, metavar="PATTERN",
                   help="One or more files, folders, globs or URLs: loose images (PNG/JPEG/WebP, e.g. FFHQ's "
                        "NNNNN/NNNNN.png), webdataset .tar shards, .zip archives, Parquet with image bytes, or "
                        "StyleGAN's .tfrecords.")
    g.add_argument("--labels-csv", nargs="+", default=None, metavar="CSV",
                   help="CSV file(s) with an id and a label column. Ids match by file stem "
                        "(images/levle0_10.jpg matches levle0_10). Images without a label fail with a reason. "
                        "(Named --labels-csv because Beam's --labels already sets Dataflow job labels.)")
    g.add_argument("--id-column", default="image_id", metavar="NAME",
                   help="Id column of --labels-csv (default: %(default)s).")
    g.add_argument("--label-column", default="label", metavar="NAME",
                   help="Label column of --labels-csv (default: %(default)s).")
    g.add_argument("--ffhq-metadata", default=None, metavar="JSON",
                   help="FFHQ's ffhq-dataset-v2.json: adds each face's category (needed by --split ffhq).")
    g.add_argument("--voc-annotations", action="store_true",
                   help="Read Pascal-VOC lesion boxes from the .xml beside each loose image and record a "
                        "lesion_count per patch.")
    g.add_argument("--max-image-bytes", type=_positive, default=DEFAULT_MAX_IMAGE_BYTES, metavar="N",
                   help="An image (file, archive member, Parquet cell) larger than this fails without being read: "
                        "checked against the size its container declares, then again while reading "
                        "(default: %(default)s, well above any real photo; raise it for huge uncompressed TIFF/BMP).")


def add_segment_flags(parser: argparse.ArgumentParser) -> None:
    """The skin segmenter and how it runs."""
    g = section(parser, "segmentation")
    g.add_argument("--segmenter-checkpoint", default=defaults.SEGMENTER, metavar="URI",
                   help="Folder (or URL) with weights.safetensors and config.json (default: the shipped model).")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Inference device (default: cpu).")
    g.add_argument("--batch-size", type=_positive, default=None, metavar="N",
                   help="Images per inference batch, across images (default: " + _by_device(BATCH_SIZES) + "). On cuda "
                        "every forward pass runs 32 images, padded, so that results do not depend on batching.")
    g.add_argument("--torch-threads", type=int, default=1, metavar="N",
                   help="torch intra-op threads per worker process (default: %(default)s, because runners start "
                        "one worker process per core; raise it for a single process on many cores; 0 keeps "
                        "torch's own default).")
    g.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="Refuse images whose declared size exceeds this many pixels (decompression bombs).")


def add_patch_flags(parser: argparse.ArgumentParser) -> None:
    """How faces are filtered and tiled (both jobs: a classifier must see patches cut as in training)."""
    g = section(parser, "patches")
    g.add_argument("--min-face-skin", type=_fraction, default=None, metavar="F",
                   help=f"Filter out faces whose skin fraction is below this (default: {DEFAULT_MIN_FACE_SKIN}; "
                        f"score: {SCORE_MIN_FACE_SKIN}, so that a small face in a wide photo is still judged).")
    g.add_argument("--patch-size", type=_positive, default=None, metavar="N",
                   help=f"Patch side in pixels (default: {DEFAULT_PATCH_SIZE}; score: the patch size the "
                        "classifier was trained on, from its config).")
    g.add_argument("--stride", type=_positive, default=None, metavar="N",
                   help="Step between patches; defaults to --patch-size (no overlap).")
    g.add_argument("--min-patch-skin", type=_fraction, default=None, metavar="F",
                   help=f"Keep patches whose skin coverage is at least this (default: {DEFAULT_MIN_PATCH_SKIN}; "
                        "score: the value the classifier's training patches were cut with, from its config).")
    g.add_argument("--blackout-background", action="store_true",
                   help="Set the non-skin pixels of each patch to black.")


def add_encode_flags(parser: argparse.ArgumentParser) -> None:
    """How build_dataset stores patches."""
    g = section(parser, "output")
    g.add_argument("--patch-format", choices=FORMATS, default="png",
                   help="Patch encoding: png and webp are lossless, jpeg is smaller (default: %(default)s).")
    g.add_argument("--jpeg-quality", type=int, default=95, metavar="Q",
                   help="JPEG quality 1-100 (default: %(default)s).")
    g.add_argument("--png-compression", type=int, choices=range(10), default=1, metavar="0-9",
                   help="PNG zlib level: 0 stores, 1 is entropy coding only (fastest, lossless like every level), "
                        "2-9 search for matches: up to 12%% smaller, 3-40x slower (default: %(default)s).")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Where results go."""
    g = section(parser, "output")
    g.add_argument("--output", default=None, metavar="URI", help="Output folder or URL (required).")
    g.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output.")
    g.add_argument("--resume", action="store_true",
                   help="Rerun a killed, failed or finished job on the same --output with the same arguments: "
                        "keep every image an earlier run finished, process the rest (and any input files added "
                        "since), and end with one manifest over all of them. Refused if the arguments or "
                        "checkpoints differ from the first run's.")


def add_split_flags(parser: argparse.ArgumentParser) -> None:
    """How faces are assigned to train/validation/test."""
    g = section(parser, "output")
    g.add_argument("--split", default="hash", metavar="MODE",
                   help=f"One of {', '.join(MODES)} or a fixed split name (train, validation, test). "
                        "hash: from a hash of the image id; ffhq: FFHQ's category (needs --ffhq-metadata); "
                        "path: from a train/valid/test folder in the path (default: %(default)s).")
    g.add_argument("--split-fractions", default="0.8,0.1,0.1", metavar="T,V,T",
                   help="Train, validation and test fractions for --split hash (default: %(default)s).")


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    """The classifier and what the scoring job writes."""
    g = section(parser, "scoring")
    g.add_argument("--classifier-checkpoint", default=defaults.CLASSIFIER, metavar="URI",
                   help="Folder (or URL) with the classifier's weights.safetensors and config.json.")
    g.add_argument("--classifier-batch-size", type=_positive, default=None, metavar="N",
                   help="Patches per classifier batch, across images (default: " + _by_device(BATCH_PATCHES) + "). On "
                        "cuda every forward pass runs 512 patches, padded, so that results do not depend on batching.")
    g.add_argument("--working-resolution", choices=("auto", "native"), default="auto",
                   help="auto (default): halve a photo whose detail shows it was enlarged (3x or more reliably, "
                        "40-80 %% of 2x enlargements; many 1024x1024 faces were), down to "
                        f"{MIN_WORKING_SIDE} px on its long side, before segmenting "
                        "and scoring it; the classifier never saw an enlarged photo and reads its soft blotches "
                        "as lesions. Top patches stay in the source's pixels. native: every photo at its size.")
    g.add_argument("--top-patches", type=int, default=3, metavar="N",
                   help="How many of the most suspicious patches to report per image (default: %(default)s).")
    g.add_argument("--patch-table", action="store_true",
                   help="Also write one row per scored patch, with its expected lesions.")
    g.add_argument("--verdict-threshold", type=_open_fraction, default=None, metavar="P",
                   help="Call a face 'acne' when its acne probability reaches P (default: the threshold "
                        "calibrated on validation, from the classifier's config). Lower finds more acne "
                        "and more false alarms.")



ALL_FLAG_GROUPS: tuple[FlagGroup, ...] = (
    add_input_flags, add_segment_flags, add_patch_flags, add_encode_flags, add_split_flags, add_score_flags,
    add_output_flags,
)


class AcneOptions(PipelineOptions):
    """Every job flag, as one Beam options group."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        for add_flags in ALL_FLAG_GROUPS:
            add_flags(parser)


def job_parser(groups: Sequence[FlagGroup], prog: str, description: str, examples: str = "") -> argparse.ArgumentParser:
    """The job's own flags, for --help and validation: one section per stage, then Beam flags, then ``examples``."""
    parser = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} --input PATTERN... --output URI [flags] [Beam flags]", description=description,
        epilog=BEAM_EPILOG + (f"\nexamples:\n{examples}" if examples else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # else Beam's --labels would silently abbreviate our --labels-csv
    )
    for add_flags in groups:
        add_flags(parser)
    return parser


def _dest(flag: str) -> str:
    """The options key argparse gives a flag: ``--min-face-skin=0.3`` -> ``min_face_skin``."""
    return flag.split("=", 1)[0].lstrip("-").replace("-", "_")


def unknown_flags(beam_args: Sequence[str], own: Sequence[str]) -> list[str]:
    """The flags in ``beam_args`` that neither Beam nor this job takes, each with a suggestion if one is close.

    ``own`` are this job's option keys. Beam parses ``beam_args`` itself (``get_all_options``), so
    its aliases and negated flags count as known; what it would keep only as an unknown option is
    a typo. A flag of the other job is known to Beam through ``AcneOptions`` but unused here.
    """
    known = PipelineOptions([]).get_all_options()
    parsed = PipelineOptions(list(beam_args)).get_all_options(retain_unknown_options=True)
    typos = set(parsed) - set(known)
    other_job = set(job_parser(ALL_FLAG_GROUPS, "", "").parse_known_args([])[0].__dict__) - set(own)
    spellings = [f"--{key.replace('_', '-')}" for key in own] + [f"--{key}" for key in known if key not in other_job]
    problems = []
    for arg in beam_args:
        if not arg.startswith("-") or _dest(arg) not in typos | other_job:
            continue
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, spellings, n=1)
        problems.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return problems


def parse(
    argv: Sequence[str] | None, groups: Sequence[FlagGroup], prog: str, description: str, examples: str = ""
) -> tuple[argparse.Namespace, PipelineOptions]:
    """Parse job flags (printing --help, rejecting bad values and unknown flags) and hand Beam's flags to Beam."""
    parser = job_parser(groups, prog, description, examples)
    flags, beam_args = parser.parse_known_args(argv)
    unknown = unknown_flags(beam_args, list(vars(flags)))
    if unknown:
        parser.error(f"unknown flag(s): {', '.join(unknown)}. Neither {prog.split('.')[-1]} nor Beam knows them "
                     "(Beam would drop them and run with the defaults); see --help.")
    if not flags.input:
        parser.error("--input is required: pass one or more paths, globs or URLs")
    if not flags.output:
        parser.error("--output is required")
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        # Beam would otherwise try to download its Prism runner first.
        beam_args = ["--runner=DirectRunner", *beam_args]
    pipeline_options = PipelineOptions(beam_args)
    return flags, pipeline_options
