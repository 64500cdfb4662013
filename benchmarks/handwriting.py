"""How well predict.py reads real handwriting handed over as people hand it over: on a page.

    python benchmarks/handwriting.py --data-dir DIR              # DIR/MNIST/raw: MNIST's files
    python benchmarks/handwriting.py --data-dir DIR --model runs/mnist-mlp/best_model.pt

Digits: the first --n of DIR's test images (never trained on). Each is drawn on a 400x300 page as a
photo or scan would show it: grey paper, lit unevenly (a slope of up to a third of its brightness),
with noise; the digit 50-150 px tall, anywhere on the page; every fifth as light chalk on a dark
board; every other page saved as JPEG. predict.py reads each page file; the same digits are also
classified as MNIST gives them (centred 28x28). The model: --model, else one trained here on DIR's
training images (train_loop.train, 5 epochs, a configuration of the kind a short study picks).
Last, the seconds predict.py takes to prepare one 4000x3000 photo (median of 5).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import predict  # noqa: E402
from train_loop import DEFAULT_HPARAMS, load_mnist, retrain_on_train_and_val, read_idx  # noqa: E402


def draw_page(digit, rng, size=(400, 300), chalk=False):
    """A page as a photo shows it, with `digit` (28x28, ink 0-1, light on dark as in MNIST) written
    on it: uneven grey paper, noise, the digit 50-150 px tall at a random place. 8-bit grey."""
    width, height = size
    tall = int(rng.integers(50, 151))
    ink = np.asarray(Image.fromarray(digit.astype(np.float32)).resize((tall, tall), Image.Resampling.BICUBIC))
    ys, xs = np.mgrid[0:height, 0:width] / max(size)
    slope = rng.uniform(-1, 1, size=2) * rng.uniform(0, 1 / 3)  # the light falls off to one side
    if chalk:  # light chalk on a dark board
        page, stroke = rng.uniform(0.1, 0.3) * (1 + slope[0] * ys + slope[1] * xs), rng.uniform(0.5, 0.8)
    else:  # dark ink on light paper
        page, stroke = rng.uniform(0.65, 0.95) * (1 + slope[0] * ys + slope[1] * xs), -rng.uniform(0.45, 0.7)
    top, left = rng.integers(0, height - tall), rng.integers(0, width - tall)
    page[top:top + tall, left:left + tall] += stroke * np.clip(ink, 0, 1)
    page += rng.normal(0, 0.03, size=page.shape)
    return Image.fromarray((np.clip(page, 0, 1) * 255).astype(np.uint8))


def accuracy(model, inputs, labels):
    return sum(answer[0][0] == label for answer, label in zip(predict.classify(model, inputs, 1), labels)) / len(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--model", help="a best_model.pt (default: train one here)")
    parser.add_argument("--n", type=int, default=200, help="digits (default: 200)")
    args = parser.parse_args()
    data = load_mnist(args.data_dir, torch.device("cpu"), download=False)
    if args.model:
        model = predict.load_model(args.model)
    else:
        hparams = dict(DEFAULT_HPARAMS, learning_rate=0.05, hidden_size=256, layer_size=2, epochs=5)
        model = retrain_on_train_and_val(data, hparams, seed=0).eval()
    raw = os.path.join(args.data_dir, "MNIST", "raw")
    digits = read_idx(raw, "t10k-images-idx3-ubyte")[:args.n].numpy() / 255
    labels = read_idx(raw, "t10k-labels-idx1-ubyte")[:args.n].tolist()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        inputs = []
        for i, digit in enumerate(digits):
            path = os.path.join(folder, f"page{i:04d}.{'jpg' if i % 2 else 'png'}")
            draw_page(digit, rng, chalk=i % 5 == 4).save(path)
            inputs.append(predict.to_input(predict.prepare(path)[1]))
        on_pages = accuracy(model, torch.stack(inputs), labels)
        photo = os.path.join(folder, "photo.jpg")
        draw_page(digits[0], rng, size=(4000, 3000)).save(photo, quality=90)
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            predict.prepare(photo)
            seconds.append(time.perf_counter() - start)
    centred = accuracy(model, data["test_x"][:args.n], labels)
    print(f"{args.n} real digits (DIR's test images), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"right on pages: {on_pages:.1%}   right centred as in MNIST: {centred:.1%}   "
          f"difference {100 * (centred - on_pages):+.1f} points")
    print(f"preparing one 4000x3000 JPEG photo: {statistics.median(seconds):.2f} s")


if __name__ == "__main__":
    main()
