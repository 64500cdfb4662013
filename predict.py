"""Classify digits with the model a study kept: images of your own, or MNIST's test images.

    python predict.py my_digit.png another.jpg               # with runs/mnist-mlp/best_model.pt
    python predict.py --test 10 --data-dir data              # the first 10 test images, with their labels
    python predict.py my_digit.png --model runs/other/best_model.pt

An image of your own is made to look like MNIST before the model sees it: grayscale, resized to
28x28, inverted when its background is light (MNIST digits are white on black), scaled to 0-1,
normalised with MNIST's mean and standard deviation, and flattened to 784 numbers: exactly what
train_loop.load_mnist does to MNIST. For best results, crop your image close around the digit.
"""
import os
import sys

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from mlp import MLP
from train_loop import MNIST_MEAN, MNIST_STD, MODEL_KEYS, Parser, SetupError, load_mnist, whole_number

MODEL = os.path.join("runs", "mnist-mlp", "best_model.pt")  # where tune.py keeps the retrained winner


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


def image_to_input(path):
    """One image file -> the 784 normalised numbers the model was trained on."""
    try:
        with Image.open(path) as image:
            pixels = pil_to_tensor(image.convert("L").resize((28, 28), Image.Resampling.BILINEAR))
    except (FileNotFoundError, IsADirectoryError):
        raise SetupError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError):
        raise SetupError(f"{path}: not an image (expected a PNG or JPEG of one digit)") from None
    pixels = pixels.float() / 255
    if pixels.mean() > 0.5:  # mostly light: a dark digit on paper; MNIST's are light on black
        pixels = 1 - pixels
    return ((pixels - MNIST_MEAN) / MNIST_STD).flatten()


@torch.inference_mode()
def classify(model, inputs):
    """Rows of 784 numbers -> (predicted digits, their probabilities)."""
    probabilities = torch.softmax(model(inputs), dim=1)
    confidence, digits = probabilities.max(dim=1)
    return digits.tolist(), confidence.tolist()


def parse_args(argv=None):
    parser = Parser(description="Classify digit images with a model tune.py kept.")
    parser.add_argument("images", nargs="*", help="PNG or JPEG files, one digit each")
    parser.add_argument("--model", default=MODEL, help=f"(default: {MODEL})")
    parser.add_argument("--test", type=whole_number(1), metavar="N", help="classify the first N MNIST test images instead")
    parser.add_argument("--data-dir", default="data", help="MNIST root for --test, MNIST/raw inside (default: data)")
    args = parser.parse_args(argv)
    if not args.images and args.test is None:
        parser.error("give image files, or --test N")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model = load_model(args.model)
        if args.test is not None:
            data = load_mnist(args.data_dir, torch.device("cpu"), download=False)
            inputs, labels = data["test_x"][:args.test], data["test_y"][:args.test].tolist()
            names = [f"test image {i}" for i in range(len(labels))]
        else:
            inputs, labels, names = torch.stack([image_to_input(path) for path in args.images]), None, args.images
    except SetupError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    digits, confidences = classify(model, inputs)
    for i, (name, digit, confidence) in enumerate(zip(names, digits, confidences)):
        truth = "" if labels is None else f"  (true {labels[i]}{'' if labels[i] == digit else ', WRONG'})"
        print(f"{name}: {digit}  probability {confidence:.3f}{truth}")
    if labels is not None:
        print(f"{sum(d == y for d, y in zip(digits, labels))} of {len(labels)} right")


if __name__ == "__main__":
    main()
