"""How fast is one trial's training? Three ways, side by side, in one run, on the same digits.

    python benchmarks/train_speed.py --data-dir DIR

anchor   the usual way (optuna-examples pytorch/pytorch_simple.py): a DataLoader over
         torchvision's MNIST with per-image ToTensor + Normalize, built again for the trial
project  train_loop.train itself (imported, not copied), validation passes included
ceiling  only the model's own matrix products at the real shapes (forward, and both backward
         products of each layer): what a step would cost if nothing else did

Each figure is the median of --repeats runs, the three ways interleaved so that a noisy
neighbour slows them alike. Samples/s count training images; validation is extra work that
only the project does (its share is printed too).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_loop import (DEFAULT_HPARAMS, VALIDATIONS_PER_EPOCH, MNIST_MEAN, MNIST_STD,  # noqa: E402
                        evaluate, load_mnist, pick_device, seeded_model, train)

BATCH_SIZES = (32, 256, 1024)


def anchor(data_dir, hparams, device):
    """One epoch the pytorch_simple.py way; returns (images, seconds)."""
    start = time.perf_counter()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    dataset = torchvision.datasets.MNIST(data_dir, train=True, transform=transform)
    loader = DataLoader(dataset, batch_size=hparams["batch_size"], shuffle=True)
    model = seeded_model(hparams, 0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=hparams["learning_rate"], momentum=hparams["momentum"],
                                nesterov=hparams["nesterov"], weight_decay=hparams["weight_decay"])
    model.train()
    for images, labels in loader:
        images, labels = images.view(images.size(0), -1).to(device), labels.to(device)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    synchronize(device)
    return len(dataset), time.perf_counter() - start


def project(data, hparams, device):
    """One epoch of the real train(), validation at the default rate included; returns (images, seconds)."""
    model = seeded_model(hparams, 0)
    start = time.perf_counter()
    for _ in train(model, data, hparams):
        pass
    synchronize(device)
    return len(data["train_x"]), time.perf_counter() - start


def ceiling(hparams, device, n_images):
    """The same number of images through the model's matrix products alone; returns (images, seconds)."""
    widths = [hparams["in_size"]] + [hparams["hidden_size"]] * hparams["layer_size"] + [hparams["out_size"]]
    batch = hparams["batch_size"]
    steps = -(-n_images // batch)
    layers = [(torch.randn(batch, w_in, device=device), torch.randn(w_out, w_in, device=device),
               torch.randn(batch, w_out, device=device)) for w_in, w_out in zip(widths, widths[1:])]
    start = time.perf_counter()
    for _ in range(steps):
        for index, (x, weight, grad_out) in enumerate(layers):
            torch.mm(x, weight.t())                   # forward
            torch.mm(grad_out.t(), x)                 # backward: gradient of the weight
            if index > 0:                             # (no gradient is needed for the input images)
                torch.mm(grad_out, weight)            # backward: gradient of the layer's input
    synchronize(device)
    return steps * batch, time.perf_counter() - start


def validation_share(data, hparams):
    """Seconds of the default validation passes over one epoch's training time."""
    model = seeded_model(hparams, 0)
    start = time.perf_counter()
    for _ in train(model, data, hparams):
        pass
    trial_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(VALIDATIONS_PER_EPOCH):
        evaluate(model, data["val_x"], data["val_y"])
    return (time.perf_counter() - start) / trial_seconds


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--device", default="auto", help="(default: auto)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is shown (default: 5)")
    args = parser.parse_args()
    device = pick_device(args.device)
    data = load_mnist(args.data_dir, device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"MLP {DEFAULT_HPARAMS['in_size']}-{DEFAULT_HPARAMS['hidden_size']}x{DEFAULT_HPARAMS['layer_size']}-"
          f"{DEFAULT_HPARAMS['out_size']}, "
          f"{len(data['train_x'])} training images (anchor: {len(data['train_x']) + len(data['val_x'])})")
    print(f"{'batch':>6} {'anchor/s':>10} {'project/s':>10} {'ceiling/s':>10} {'project/anchor':>15} "
          f"{'project/ceiling':>16}")
    for batch_size in BATCH_SIZES:
        hparams = dict(DEFAULT_HPARAMS, batch_size=batch_size, epochs=1)
        rates = {"anchor": [], "project": [], "ceiling": []}
        for _ in range(args.repeats):
            for name, images_and_seconds in (("anchor", lambda: anchor(args.data_dir, hparams, device)),
                                             ("project", lambda: project(data, hparams, device)),
                                             ("ceiling", lambda: ceiling(hparams, device, len(data["train_x"])))):
                images, seconds = images_and_seconds()
                rates[name].append(images / seconds)
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(f"{batch_size:>6} {median['anchor']:>10,.0f} {median['project']:>10,.0f} {median['ceiling']:>10,.0f} "
              f"{median['project'] / median['anchor']:>14.1f}x {median['project'] / median['ceiling']:>15.0%}")
    hparams = dict(DEFAULT_HPARAMS, epochs=1)
    share = statistics.median(validation_share(data, hparams) for _ in range(args.repeats))
    print(f"validation at {VALIDATIONS_PER_EPOCH} passes per epoch: {share:.1%} of a batch-{hparams['batch_size']} "
          "trial's time")


if __name__ == "__main__":
    main()
