"""Where does a training step's time go? torch.profiler over one epoch of the real train().

    python benchmarks/profile_step.py --data-dir DIR

Prints, per batch size, the share of CPU time in the model's matrix products, in dropout's random
masks, in the optimizer, and in everything else (autograd bookkeeping, Python, small ops), then
the heaviest operators, and the speed of the same epoch without dropout for comparison.
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_loop import DEFAULT_HPARAMS, load_mnist, pick_device, seeded_model, train  # noqa: E402

GROUPS = {  # operator name -> what it is part of
    "aten::mm": "matrix products", "aten::addmm": "matrix products",
    "aten::bernoulli_": "dropout masks", "aten::div_": "dropout masks",
    "aten::_fused_sgd_": "optimizer", "Optimizer.step#SGD.step": "optimizer",
    "Optimizer.zero_grad#SGD.zero_grad": "optimizer",
}


def epoch_seconds(data, hparams):
    model = seeded_model(hparams, 0)
    start = time.perf_counter()
    for _ in train(model, data, hparams):
        pass
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1024], help="(default: 32 1024)")
    args = parser.parse_args()
    data = load_mnist(args.data_dir, pick_device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, default MLP, one epoch of "
          f"{len(data['train_x'])} images")
    for batch_size in args.batch_sizes:
        hparams = dict(DEFAULT_HPARAMS, batch_size=batch_size, epochs=1)
        epoch_seconds(data, hparams)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in train(seeded_model(hparams, 0), data, hparams):
                pass
        events = profiler.key_averages()
        total = sum(event.self_cpu_time_total for event in events)
        shares = {}
        for event in events:
            group = GROUPS.get(event.key, "everything else")
            shares[group] = shares.get(group, 0) + event.self_cpu_time_total / total
        print(f"\nbatch {batch_size}: " + ", ".join(f"{group} {share:.0%}" for group, share in
                                               sorted(shares.items(), key=lambda item: -item[1])))
        for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:6]:
            print(f"    {event.key:<40} {event.self_cpu_time_total / total:>5.1%} {event.count:>7} calls")
        with_dropout = min(epoch_seconds(data, hparams) for _ in range(3))
        without = min(epoch_seconds(data, dict(hparams, dropout=0.0)) for _ in range(3))
        print(f"    samples/s: {len(data['train_x']) / with_dropout:,.0f} with dropout 0.2, "
              f"{len(data['train_x']) / without:,.0f} without")


if __name__ == "__main__":
    main()
