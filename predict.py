"""Classify digits with the model a study kept: photos, scans or drawings of your own, or MNIST's test images.

    python predict.py my_digit.jpg page2.png                # with runs/mnist-mlp/best_model.pt
    python predict.py photos/ --show seen/                  # every image in a folder; what the model saw
    python predict.py --test 10 --data-dir data             # the first 10 test images, with their labels
    python predict.py my_digit.png --model runs/other/best_model.pt --top 1

An image of your own is prepared the way MNIST's digits were (LeCun et al.): made grayscale, the
ink told from the paper, the digit cut out, fitted into 20x20 pixels keeping its shape, and placed
in a 28x28 frame so that its centre of mass is in the middle; then scaled and normalised exactly
as train_loop.load_mnist does. Each line: the file and the 3 likeliest digits with probabilities.
"""
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

from mlp import MLP
from report import cannot_write
from train_loop import MNIST_MEAN, MNIST_STD, MODEL_KEYS, Parser, SetupError, load_mnist, whole_number

MODEL = os.path.join("runs", "mnist-mlp", "best_model.pt")  # where tune.py keeps the retrained winner
WORK_SIZE = 1600     # pixels on the long side an image is reduced to first: plenty for one digit,
                     # and a 24-megapixel photo then takes a second and megabytes, not gigabytes
MIN_CONTRAST = 0.1   # ink this close to the paper (on a 0-1 scale) is no ink: the page is blank
SHOW_SCALE = 8       # --show enlarges the 28x28 input 8 times, pixels kept square


class Unreadable(Exception):
    """One image that cannot be classified; the message says why. The others still are."""


def load_model(path):
    """The MLP that tune.py saved: its hyperparameters rebuild it, its state_dict fills it."""
    if not os.path.isfile(path):
        raise SetupError(f"--model {path}: no such file; run tune.py first, or pass the best_model.pt it wrote")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no code
        model = MLP(*(saved["hparams"][key] for key in MODEL_KEYS))
        model.load_state_dict(saved["state_dict"])
    except Exception as error:  # not a torch file, another model's file, another shape
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SetupError(f"--model {path}: not a best_model.pt of this MLP ({reason})") from None
    return model.eval()


def read_grayscale(path):
    """The image as floats from 0 (black) to 1 (white), at most WORK_SIZE on its long side."""
    try:
        with Image.open(path) as image:  # a GIF or TIFF of several frames: the first
            image.draft("L", (WORK_SIZE, WORK_SIZE))  # a JPEG decodes at 1/2, 1/4 or 1/8 size: fast, small
            image = ImageOps.exif_transpose(image)  # phones store "rotate me" as a tag, not in the pixels
            if "A" in image.getbands() or "transparency" in image.info:  # a drawing on a transparent canvas
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            if image.mode.startswith("I"):  # 16-bit scans (PNG, TIFF): keep their precision
                image, full_scale = image.convert("F"), 65535
            else:  # 8-bit grey, colour or a palette
                image, full_scale = image.convert("L"), 255
            image.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
            return np.asarray(image, dtype=np.float32) / full_scale
    except (FileNotFoundError, IsADirectoryError):
        raise Unreadable("no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise Unreadable("not an image (expected a PNG, JPEG or other picture of one digit)") from None


def ink_of(gray):
    """How much ink each pixel holds, from 0 (paper) to 1 (a full stroke): MNIST's light-on-black."""
    # Ink or chalk? Paper covers most of a page: a light median means dark ink on light paper.
    ink = 1 - gray if np.median(gray) > 0.5 else gray.copy()
    # Uneven light (a shadow, a lamp to one side) is a slope in the paper's level. The level: the
    # median of each block of a 16x16 grid, and the least of those around it (strokes cover less
    # than half a block, or of its neighbours), spread smoothly back; subtracted, paper is 0.
    k = max(4, max(ink.shape) // 16)
    rows, cols = -(-ink.shape[0] // k), -(-ink.shape[1] // k)
    blocks = np.pad(ink, ((0, rows * k - ink.shape[0]), (0, cols * k - ink.shape[1])), mode="edge")
    level = np.median(blocks.reshape(rows, k, cols, k).swapaxes(1, 2).reshape(rows, cols, k * k), axis=2)
    level = Image.fromarray(level.astype(np.float32)).filter(ImageFilter.MinFilter(3))
    ink -= np.asarray(level.resize(ink.shape[::-1], Image.Resampling.BILINEAR))
    # Specks of noise or dust out (a 3x3 median), then faint ink off and strong strokes to 1, as in
    # MNIST, relative to the strongest ink.
    ink = np.asarray(Image.fromarray(ink).filter(ImageFilter.MedianFilter(3)))
    strongest = float(ink.max())
    if strongest < MIN_CONTRAST:
        raise Unreadable("no digit found: the image is blank, or its ink too faint")
    return np.clip((ink - 0.35 * strongest) / (0.45 * strongest), 0, 1)


def mnist_like(ink):
    """The ink cut out, fitted into 20x20 keeping its shape, placed in 28x28 by its centre of mass."""
    def span(mass):  # the first and last index inside the middle 99.6% of the ink: a stray speck falls outside
        share = np.cumsum(mass) / mass.sum()
        return int(np.searchsorted(share, 0.002)), int(np.searchsorted(share, 0.998)) + 1
    (top, bottom), (left, right) = span(ink.sum(axis=1)), span(ink.sum(axis=0))
    digit = Image.fromarray(ink[top:bottom, left:right])
    scale = 20 / max(digit.size)
    size = (max(1, round(digit.width * scale)), max(1, round(digit.height * scale)))
    digit = np.clip(np.asarray(digit.resize(size, Image.Resampling.LANCZOS)), 0, 1)  # anti-aliased, as MNIST's
    rows, cols = np.indices(digit.shape)
    centre = (rows * digit).sum() / digit.sum(), (cols * digit).sum() / digit.sum()
    # MNIST's centres of mass sit at (14, 14), counting pixels from 0.
    top, left = (int(np.clip(round(14 - c), 0, 28 - n)) for c, n in zip(centre, digit.shape))
    frame = np.zeros((28, 28), dtype=np.float32)
    frame[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return frame


def prepare(path):
    """An image file -> (its grayscale, as read) and the 28x28 frame of ink the model is given."""
    gray = read_grayscale(path)
    return gray, mnist_like(ink_of(gray))


def to_input(frame):
    """A 28x28 frame of ink (0-1) -> the 784 normalised numbers the model was trained on."""
    return ((torch.from_numpy(frame) - MNIST_MEAN) / MNIST_STD).flatten()


@torch.inference_mode()
def classify(model, inputs, top=3):
    """Rows of 784 numbers -> for each, the `top` likeliest digits as (digit, probability)."""
    probabilities, digits = torch.softmax(model(inputs), dim=1).topk(top, dim=1)
    return [list(zip(row_digits.tolist(), row_probabilities.tolist()))
            for row_digits, row_probabilities in zip(digits, probabilities)]


def answer_text(answer):
    return ", ".join(f"{digit} ({probability:.3f})" for digit, probability in answer)


def show(folder, path, gray, frame, answer):
    """FOLDER/NAME.png: the image as read, beside what the model saw (enlarged), the answer below."""
    original = Image.fromarray((gray * 255).astype(np.uint8))
    original.thumbnail((2 * 28 * SHOW_SCALE, 28 * SHOW_SCALE))
    seen = Image.fromarray((frame * 255).astype(np.uint8)).resize((28 * SHOW_SCALE,) * 2, Image.Resampling.NEAREST)
    canvas = Image.new("L", (original.width + seen.width + 10, seen.height + 24), 255)
    canvas.paste(original, (0, 0))
    canvas.paste(seen, (original.width + 10, 0))
    ImageDraw.Draw(canvas).text((4, seen.height + 6), f"model saw (right): {answer_text(answer)}", fill=0)
    canvas.save(os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + ".png"))


def image_paths(arguments):
    """The files named, with each folder's files (sorted; hidden ones left out) in its place."""
    for argument in arguments:
        if os.path.isdir(argument):
            yield from (os.path.join(argument, name) for name in sorted(os.listdir(argument))
                        if not name.startswith(".") and os.path.isfile(os.path.join(argument, name)))
        else:
            yield argument


def parse_args(argv=None):
    parser = Parser(description="Classify digit images with a model tune.py kept.")
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...) of one digit each, or folders of them")
    parser.add_argument("--model", default=MODEL, help=f"(default: {MODEL})")
    parser.add_argument("--top", type=whole_number(1), default=3, help="likeliest digits shown per image (default: 3)")
    parser.add_argument("--show", metavar="DIR", help="write each image beside the 28x28 input the model saw (default: off)")
    parser.add_argument("--test", type=whole_number(1), metavar="N", help="classify the first N MNIST test images instead")
    parser.add_argument("--data-dir", default="data", help="MNIST root for --test, MNIST/raw inside (default: data)")
    args = parser.parse_args(argv)
    if not args.images and args.test is None:
        parser.error("give image files or folders, or --test N")
    if args.top > 10:
        parser.error("--top: there are only 10 digits")
    if args.show and (problem := cannot_write(args.show)):
        parser.error(f"--show {args.show}: cannot write there ({problem}); pass another folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model = load_model(args.model)
        data = load_mnist(args.data_dir, torch.device("cpu"), download=False) if args.test is not None else None
    except SetupError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if data is not None:  # MNIST's own test images: already prepared, and labelled
        labels = data["test_y"][:args.test].tolist()
        answers = classify(model, data["test_x"][:args.test], args.top)
        for i, (answer, label) in enumerate(zip(answers, labels)):
            print(f"test image {i}: {answer_text(answer)}  (true {label}{'' if answer[0][0] == label else ', WRONG'})")
        return print(f"{sum(answer[0][0] == label for answer, label in zip(answers, labels))} of {len(labels)} right")
    failed = 0
    for path in image_paths(args.images):
        try:
            gray, frame = prepare(path)
        except Unreadable as error:  # this file only: the others are still classified
            print(f"predict.py: error: {path}: {error}", file=sys.stderr)
            failed += 1
            continue
        [answer] = classify(model, to_input(frame)[None], args.top)
        print(f"{path}: {answer_text(answer)}", flush=True)
        if args.show:
            show(args.show, path, gray, frame, answer)
    sys.exit(2 if failed else 0)


if __name__ == "__main__":
    main()
