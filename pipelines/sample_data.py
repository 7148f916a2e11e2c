"""Builds the default input of ``run_local.sh``: a small FFHQ-style folder, made at run time.

The photos are public-domain images that ship inside installed packages (matplotlib's
Grace Hopper, scikit-image's astronaut Eileen Collins and its coffee cup), scaled to FFHQ's
1024x1024 and laid out as ``NNNNN/NNNNN.png``. Two broken files are added on purpose so
the dead-letter output has something to show. No third-party image is kept in the repo.

    python -m pipelines.sample_data OUT_DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import matplotlib
import numpy as np

FFHQ_SIZE = 1024


def _package_image(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
    if pixels is None:
        raise FileNotFoundError(f"sample photo {path} is missing from its package")
    return pixels


def portraits() -> dict[str, np.ndarray]:
    """Public-domain photos from installed packages, as RGB arrays."""
    import skimage

    mpl_data = Path(matplotlib.get_data_path()) / "sample_data"
    sk_data = Path(skimage.__file__).parent / "data"
    return {
        "grace_hopper": _package_image(mpl_data / "grace_hopper.jpg"),
        "astronaut": _package_image(sk_data / "astronaut.png"),
        "coffee": _package_image(sk_data / "coffee.png"),
    }


def ffhq_square(pixels: np.ndarray, box: tuple[float, float, float] = (0.5, 0.5, 1.0)) -> np.ndarray:
    """A square crop (centre x, centre y, side as a fraction of the short side) at 1024x1024."""
    height, width = pixels.shape[:2]
    side = int(min(height, width) * box[2])
    x0 = int(np.clip(box[0] * width - side / 2, 0, width - side))
    y0 = int(np.clip(box[1] * height - side / 2, 0, height - side))
    crop = pixels[y0 : y0 + side, x0 : x0 + side]
    return cv2.resize(crop, (FFHQ_SIZE, FFHQ_SIZE), interpolation=cv2.INTER_CUBIC)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))


def build_sample(out_dir: Path) -> list[Path]:
    """Write the sample folder; return the files in it."""
    photos = portraits()
    images = {
        # Crops tight around the face, as FFHQ's alignment frames them.
        0: ffhq_square(photos["grace_hopper"], (0.5, 0.35, 0.7)),
        1: ffhq_square(photos["astronaut"], (0.44, 0.26, 0.38)),
        2: ffhq_square(photos["grace_hopper"][:, ::-1], (0.5, 0.33, 0.6)),
        3: ffhq_square(photos["astronaut"], (0.45, 0.27, 0.42)),
        4: ffhq_square(photos["coffee"]),
    }
    files = []
    for index, pixels in images.items():
        path = out_dir / f"{index // 1000 * 1000:05d}" / f"{index:05d}.png"
        write_png(path, pixels)
        files.append(path)
    # Broken on purpose: a PNG cut off halfway, and a text file wearing a .png name.
    whole = files[0].read_bytes()
    truncated = out_dir / "00000" / "00005.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    not_image = out_dir / "00000" / "00006.png"
    not_image.write_text("this is not an image\n")
    return files + [truncated, not_image]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="Folder to create the sample in.")
    files = build_sample(parser.parse_args().out_dir)
    print(f"sample: {len(files)} files in FFHQ layout under {files[0].parent.parent}")


if __name__ == "__main__":
    main()
