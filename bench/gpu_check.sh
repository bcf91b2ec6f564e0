#!/usr/bin/env bash
# The GPU check: one command for a fresh H100 / H200 machine with no internet.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # from anywhere; results in OUT_DIR, else $OUT, else
#                                              # bench/results/gpu_check-<UTC time>/ (at most 8 files)
#   GPU_CHECK_PLAN=1 bash bench/gpu_check.sh   # print the plan (stage NAME cap SECONDS ... budget SECONDS)
#
# The stages, their caps and the report are in bench/gpu_check.py (its docstring says what each
# stage answers); this file only finds the Python and the repository.
#
# Python packages the machine lacks may travel as wheels in the git-ignored folder .whl/ at the
# repository root (downloaded elsewhere for the GPU machine's Python, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# ); they are installed into /tmp/site, which goes on PYTHONPATH. mole_ext needs only torch and
# numpy, which the GPU images have, so .whl/ is normally absent.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
if [ "${GPU_CHECK_PLAN:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" bench/gpu_check.py "$@"
