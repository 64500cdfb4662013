"""The GPU's tests and figures in one unattended run that ends by its deadline and always prints its table.

    python benchmarks/gpu_check.py --data-dir DIR        # benchmarks/gpu_check.sh runs it, after checking
                                                         # that there is a GPU and every package it needs

Each part runs as a process of its own, given what is left of the deadline (default 460 s); a part
cut short or failing says so in its row, and the table still comes:
  tests     tests/test_gpu.py: captured steps repeat themselves and resume bit for bit, agree with
            eager steps, free their memory over 100 trials; a CPU checkpoint resumes on the GPU
  speed     train() eagerly and captured (--cuda-graph): training images a second at batch 32, 256
            and 1024, one epoch of 60,000 images each; and how far the two runs' weights end apart
  studies   the seed post's study (`tune.py --n-trials 16 --epochs 3`) on DIR, eager and captured;
            the default study (30 x 3) at 60,000 images, captured: wall seconds, start to exit
  workers   40 trials x 3 epochs at 60,000 images with 1 and 4 workers on the one GPU: trials a minute
  mps       (--mps only) the 4 workers under NVIDIA's Multi-Process Service, a daemon of its own
"60,000 images": DIR's training images repeated in a temporary copy when DIR has fewer (time per
epoch depends on how many images there are, not on which).
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = {"tests": 170, "speed": 70, "studies": 120, "workers": 90, "mps": 60}  # seconds a part may take at most
ROW = "ROW\t"  # how a part's process tells a row of the table


def row(what, figure):
    print(f"{ROW}{what}\t{figure}", flush=True)


def run_parts(names, args, deadline):
    """Each part in a process of its own, cut at its budget or the deadline; the table's rows, and
    whether every part ran to its end."""
    rows, whole = [], True
    for name in names:
        left = min(BUDGETS[name], deadline - time.monotonic())
        if left < 5:
            rows.append((name, "not run: the deadline came first"))
            whole = False
            continue
        command = [sys.executable, os.path.abspath(__file__), "--part", name, *sys_args(args)]
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            output = process.communicate(timeout=left)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0]
            rows.append((name, f"cut short after {left:.0f} s (its budget or the deadline)"))
            whole = False
        lines = output.splitlines()
        rows += [tuple(line[len(ROW):].split("\t", 1)) for line in lines if line.startswith(ROW)]
        if process.returncode not in (0, -signal.SIGKILL):
            last = next((line for line in reversed(lines) if line.strip() and not line.startswith(ROW)), "")
            rows.append((name, f"FAILED (exit code {process.returncode}): {last[:150]}"))
            whole = False
        print(output, end="", flush=True)
    return rows, whole


def sys_args(args):
    return ["--data-dir", args.data_dir, "--folder", args.folder]


# ---------------------------------------------------------------------------- the parts, each in its process
def tests(args):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "tests/test_gpu.py"],
                            cwd=ROOT, capture_output=True, text=True)
    print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
    lines = result.stdout.splitlines()
    row("GPU tests", next((line for line in reversed(lines) if " in " in line and ("passed" in line or "failed" in line)),
                          "no summary"))
    for line in lines:
        if line.startswith("GPU memory"):
            row("GPU memory after 5 and 100 trials", line.split("trials", 1)[1].strip())
    sys.exit(result.returncode)


def big_data(args):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from workers import repeat_training_images
    folder = os.path.join(args.folder, "data60000")
    if not os.path.exists(folder):
        repeat_training_images(args.data_dir, 60000, folder)
    return folder


def speed(args):
    import torch
    sys.path.insert(0, ROOT)
    from train_loop import DEFAULT_HPARAMS, load_mnist, seeded_model, train
    data = load_mnist(big_data(args), torch.device("cuda"), download=False)
    for batch_size in (32, 256, 1024):
        hparams = dict(DEFAULT_HPARAMS, batch_size=batch_size, epochs=1)
        rates, ends = {False: [], True: []}, {}
        for _ in range(3):  # the first of each is a warm-up (CUDA's and cuBLAS's lazy set-up)
            for captured in (False, True):
                model = seeded_model(hparams, 0)
                torch.cuda.synchronize()
                start = time.perf_counter()
                *_, val = train(model, data, hparams, cuda_graph=captured)
                torch.cuda.synchronize()
                rates[captured].append(len(data["train_x"]) / (time.perf_counter() - start))
                ends[captured] = model.state_dict(), val.accuracy
        eager, captured = statistics.median(rates[False][1:]), statistics.median(rates[True][1:])
        row(f"batch {batch_size}: images/s eager, captured", f"{eager:,.0f}  {captured:,.0f}  {captured / eager:.1f}x")
        largest = max((ends[True][0][name] - tensor).abs().max().item() for name, tensor in ends[False][0].items())
        row(f"batch {batch_size}: captured vs eager: weights, accuracy",
            f"max |difference| {largest:.1e}, {100 * (ends[True][1] - ends[False][1]):+.2f} points")


def tune_wall(data_dir, out, *flags):
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "tune.py"), "--data-dir", data_dir, "--out", out, *flags],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def studies(args):
    for name, flags in (("eager", []), ("captured", ["--cuda-graph"])):
        seconds = tune_wall(args.data_dir, os.path.join(args.folder, f"seed-{name}"), "--n-trials", "16",
                            "--epochs", "3", *flags)
        row(f"16x3 study on DIR, {name}: wall", f"{seconds:.1f} s")
    seconds = tune_wall(big_data(args), os.path.join(args.folder, "default"), "--cuda-graph")
    row("default 30x3 study at 60,000 images, captured: wall", f"{seconds:.1f} s")


def workers(args, counts=(1, 4), label=""):
    import optuna
    for count in counts:
        out = os.path.join(args.folder, f"workers{count}{label.strip()}")
        seconds = tune_wall(big_data(args), out, "--n-trials", "40", "--workers", str(count), "--no-final",
                            "--cuda-graph")
        study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
        finished = [t for t in study.trials if t.state.is_finished()]
        span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
        row(f"40 trials, 60,000 images, {count} worker(s){label}: trials/min, wall",
            f"{len(finished) / span.total_seconds() * 60:.1f}  {seconds:.1f} s")


def mps(args):
    os.environ.update(CUDA_MPS_PIPE_DIRECTORY=os.path.join(args.folder, "mps"),
                      CUDA_MPS_LOG_DIRECTORY=os.path.join(args.folder, "mps-log"))
    for folder in (os.environ["CUDA_MPS_PIPE_DIRECTORY"], os.environ["CUDA_MPS_LOG_DIRECTORY"]):
        os.makedirs(folder, exist_ok=True)
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
    try:
        workers(args, counts=(4,), label=" (MPS)")
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--mps", action="store_true", help="also 4 workers under NVIDIA MPS (default: off)")
    parser.add_argument("--deadline", type=float, default=460, help="seconds for everything (default: 460)")
    parser.add_argument("--only", nargs="+", choices=list(BUDGETS), help="these parts only (default: all)")
    parser.add_argument("--part", choices=list(BUDGETS), help=argparse.SUPPRESS)  # one part, in its own process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        return globals()[args.part](args)
    deadline = time.monotonic() + args.deadline
    names = args.only or [name for name in BUDGETS if name != "mps" or args.mps]
    with tempfile.TemporaryDirectory() as folder:
        args.folder = folder
        rows, whole = run_parts(names, args, deadline)
    import torch
    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'}, torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}, {os.cpu_count()} CPUs")
    for what, figure in rows:
        print(f"{what:<58} {figure}")
    sys.exit(0 if whole else 1)


if __name__ == "__main__":
    main()
