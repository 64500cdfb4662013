#!/usr/bin/env bash
# This project's checks on a CUDA GPU in one unattended run that ends within 8 minutes and always
# prints its table: the GPU tests, then figures (benchmarks/gpu_check.py says which).
#
#     bash benchmarks/gpu_check.sh DIR            # DIR/MNIST/raw holds MNIST's four files (or fewer digits)
#     bash benchmarks/gpu_check.sh DIR --mps      # also 4 workers under NVIDIA's Multi-Process Service
#
# It needs the repository, the MNIST files, and the Python packages of requirements-test.txt; it
# first says in one line what is missing. Exit code: 0 if every test passed and every part ran.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh DIR [--mps]   (DIR/MNIST/raw holds the MNIST files)" >&2
    exit 2
fi
python=${PYTHON:-python3}
missing=$("$python" -c '
import importlib.util
modules = {"torch": "torch", "optuna": "optuna", "sqlalchemy": "SQLAlchemy", "alembic": "alembic",
           "mako": "Mako", "colorlog": "colorlog", "pandas": "pandas", "matplotlib": "matplotlib", "pytest": "pytest"}
print(" ".join(name for module, name in modules.items() if importlib.util.find_spec(module) is None))')
if [ -n "$missing" ]; then
    echo "gpu_check.sh: $python lacks $missing: pip install -r requirements-test.txt (or wheels of those)" >&2
    exit 2
fi
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check" >&2
    exit 1
fi
exec "$python" benchmarks/gpu_check.py --data-dir "$1" "${@:2}"
