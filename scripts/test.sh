#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite. Extra arguments go to pytest.
#
# Two pytest runs, both always run; the script fails if either fails:
#   1. every test but the multi-process ones, on TEST_WORKERS (default 2)
#      pytest-xdist workers. Much of a test's time is single-threaded XLA
#      compilation, so one process leaves a second core idle. Whole files go
#      to one worker (--dist loadfile): a module's fixtures (a trained
#      workdir, compiled programs) are built once, not once per worker.
#      The slowest files go first (tests/conftest.py orders them).
#   2. the multi-process tests (-m multiprocess) alone, one at a time: they
#      time peers against each other (a peer 35 s late, a kill reported
#      within 60 s), which a busy second worker would distort.
# Both share one fresh tfds data_dir, so Fashion-MNIST is prepared once.
# Plain `pytest` (no -n) still runs everything in one process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

VQVAE2_TESTS_TFDS_DIR=$(mktemp -d -t vqvae2_tfds_XXXXXX)
export VQVAE2_TESTS_TFDS_DIR
trap 'rm -rf "$VQVAE2_TESTS_TFDS_DIR"' EXIT

status=0
.venv/bin/python -m pytest -m 'not multiprocess' -n "${TEST_WORKERS:-2}" \
  --dist loadfile --no-loadscope-reorder "$@" || status=$?
serial=0
.venv/bin/python -m pytest -m multiprocess "$@" || serial=$?

# 5 is pytest's "no tests collected": fine for one run when arguments
# select tests of only one kind, a failure when neither run had any.
if [ "$status" = 5 ] && [ "$serial" != 5 ]; then status=0; fi
if [ "$serial" = 5 ] && [ "$status" != 5 ]; then serial=0; fi
if [ "$status" != 0 ]; then exit "$status"; fi
exit "$serial"
