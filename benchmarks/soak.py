"""Does a long study on the default SQLite storage ever fail a write with "database is locked"?

    python benchmarks/soak.py --data-dir DIR --minutes 10       # DIR/MNIST/raw holds MNIST-format files

Runs `python tune.py --workers 2 --heartbeat 2` (a heartbeat every 2 s: five times the default
write rate) for --minutes, while this process reads the same study every second the way
report.py does (load it, write trials.csv, print the summary; the plots every tenth time), as
someone watching a study would. At the end it counts "database is locked" and tracebacks in
tune.py's output, the reader's failed reads, and failed trials. All must be zero.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import optuna

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import report  # noqa: E402  (not parallel.py: the reader opens SQLite as any other program would)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--minutes", type=float, default=10, help="(default: 10)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.join(ROOT, "tune.py"), "--data-dir", args.data_dir, "--out", out,
                   "--workers", "2", "--heartbeat", "2", "--epochs", "1", "--n-trials", "100000",
                   "--timeout", str(int(args.minutes * 60)), "--no-final"]
        with open(os.path.join(out, "tune.log"), "w+") as log:
            tune = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            reads, failed_reads, polls = 0, [], 0
            while tune.poll() is None:
                time.sleep(1)
                polls += 1
                try:
                    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
                    report.write_trials_csv(study.trials_dataframe(), out)
                    report.summary(study)
                    if polls % 10 == 0:
                        report.save_plots(study, out)
                    reads += 1
                except KeyError:  # the study does not exist yet
                    continue
                except Exception as error:  # noqa: BLE001 - counted, not hidden
                    failed_reads.append(str(error).splitlines()[0])
            log.seek(0)
            output = log.read()
        study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
        states = [trial.state.name for trial in study.trials]
    print(f"{args.minutes:g} min, tune.py --workers 2 --heartbeat 2 and a reader every second, exit code {tune.returncode}")
    print(f"trials: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, {states.count('FAIL')} failed")
    print(f"reads: {reads} ok, {len(failed_reads)} failed {sorted(set(failed_reads))[:3]}")
    print(f'"database is locked" in tune.py\'s output: {output.count("database is locked")}; '
          f'tracebacks: {output.count("Traceback")}')


if __name__ == "__main__":
    main()
