"""The GPU's figures in one run and one table (called by benchmarks/gpu_check.sh, which runs the GPU tests first).

    python benchmarks/gpu_check.py --data-dir DIR        # DIR/MNIST/raw: MNIST's four files

1. train() eager (--no-cuda-graph) against captured steps (--cuda-graph): training images a
   second at batch 32, 256 and 1024, one epoch, validation included; and whether both ended with
   the same weights.
2. The seed post's study, `tune.py --n-trials 16 --epochs 3` on DIR, end to end (start-up, final
   retrain, plots): wall seconds, captured and eager.
3. The default study, `tune.py` (30 trials x 3 epochs) at MNIST's size, end to end.
4. 40 trials at MNIST's size with --workers 1, 2 and 4 on the one GPU (--no-final): trials a minute.
Studies 3 and 4 run with --cuda-graph.
"MNIST's size": DIR's training images repeated to 60,000 in a temporary copy when DIR has fewer
(benchmarks/workers.py does the same); time per epoch depends on how many images, not which.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import optuna
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from train_loop import DEFAULT_HPARAMS, load_mnist, seeded_model, train  # noqa: E402
from workers import repeat_training_images  # noqa: E402

rows = []  # (what, figure): the table printed at the end


def row(what, figure):
    rows.append((what, figure))
    print(f"{what:<58} {figure}", flush=True)


def images_per_second(data, hparams, cuda_graph):
    model = seeded_model(hparams, 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in train(model, data, hparams, cuda_graph=cuda_graph):
        pass
    torch.cuda.synchronize()
    return len(data["train_x"]) / (time.perf_counter() - start), model.state_dict()


def step_speed(data):
    for batch_size in (32, 256, 1024):
        hparams = dict(DEFAULT_HPARAMS, batch_size=batch_size, epochs=1)
        rates, same = {False: [], True: []}, True
        for _ in range(3):  # the first of each is a warm-up (CUDA's and cuBLAS's lazy set-up)
            rate, eager_weights = images_per_second(data, hparams, cuda_graph=False)
            rates[False].append(rate)
            rate, weights = images_per_second(data, hparams, cuda_graph=True)
            rates[True].append(rate)
            same = same and all(torch.equal(weights[name], eager_weights[name]) for name in weights)
        eager, captured = statistics.median(rates[False][1:]), statistics.median(rates[True][1:])
        row(f"batch {batch_size}: images/s eager, captured (same weights: {'yes' if same else 'NO'})",
            f"{eager:,.0f}  {captured:,.0f}  {captured / eager:.1f}x")


def tune_wall(data_dir, out, *flags):
    """Seconds `python tune.py` takes from start to exit, and the study it left."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tune.py"), "--data-dir", data_dir, "--out", out,
                             *flags], capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
        raise RuntimeError(f"tune.py {' '.join(flags)} exited with {result.returncode}")
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    return seconds, study


def studies(data_dir, big_dir, folder):
    for name, flags in (("captured", ["--cuda-graph"]), ("eager", ["--no-cuda-graph"])):
        seconds, study = tune_wall(data_dir, os.path.join(folder, f"seed-{name}"), "--n-trials", "16",
                                   "--epochs", "3", *flags)
        in_trials = sum(t.duration.total_seconds() for t in study.trials if t.duration)
        row(f"16x3 study on DIR, {name}: wall, outside trials, best",
            f"{seconds:.1f} s  {seconds - in_trials:.1f} s  {study.best_value:.4f}")
    seconds, study = tune_wall(big_dir, os.path.join(folder, "default"), "--cuda-graph")
    row("default 30x3 study at 60,000 images, final and plots: wall, best", f"{seconds:.1f} s  {study.best_value:.4f}")


def workers(big_dir, folder, counts, label):
    for count in counts:
        seconds, study = tune_wall(big_dir, os.path.join(folder, f"workers{count}{label}"), "--n-trials", "40",
                                   "--workers", str(count), "--no-final", "--cuda-graph")
        finished = [t for t in study.trials if t.state.is_finished()]
        span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
        reports = sum(len(t.intermediate_values) for t in finished)
        row(f"40 trials, 60,000 images, {count} worker(s){label}: trials/min, reports/min, wall",
            f"{len(finished) / span.total_seconds() * 60:.1f}  {reports / span.total_seconds() * 60:.0f}  "
            f"{seconds:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "studies", "workers"],
                        help="parts to leave out (default: none)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default: 1 2 4)")
    parser.add_argument("--label", default="", help="added to the workers' rows, e.g. ' (MPS)' (default: none)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA GPU here")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"optuna {optuna.__version__}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        big_dir = repeat_training_images(args.data_dir, 60000, os.path.join(folder, "data"))
        parts = {"speed": lambda: step_speed(load_mnist(big_dir, torch.device("cuda"), download=False)),
                 "studies": lambda: studies(args.data_dir, big_dir, folder),
                 "workers": lambda: workers(big_dir, folder, args.workers, args.label)}
        for name, part in parts.items():
            if name in args.skip:
                continue
            try:
                part()
            except Exception as error:  # one broken part still leaves the others' figures
                row(f"{name}: FAILED", f"{type(error).__name__}: {error}")
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for what, figure in rows:
        print(f"{what:<58} {figure}")


if __name__ == "__main__":
    main()
