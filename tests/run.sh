#!/usr/bin/env bash
# run.sh - the test command of the README and of .ci/run. On a fresh Debian 12 machine, as root:
# installs what the tests need, starts the real Slurm and the real Rucio server on this machine,
# then runs ruff, the docs build (mkdocs build --strict: broken links and anchors fail), the
# fast unit layer and the integration layer. Extra arguments go to pytest
# (e.g. `tests/run.sh -k e2e`). Fails if pytest collects no test.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
export DAC_CI_DIR=$CI_DIR
[ "$(id -u)" = 0 ] || { echo "tests/run.sh: run as root (sudo): it installs and starts Slurm and Rucio" >&2; exit 1; }

bash "$HERE/services/up.sh"

cd "$REPO"
lint=0
"$CI_DIR/venv/bin/ruff" check . || lint=$?
# the documentation site, warnings as errors: a broken link or anchor in docs/ fails the run
"$CI_DIR/venv/bin/mkdocs" build --strict --quiet --site-dir "$CI_DIR/site" \
  || { echo "tests/run.sh: mkdocs build --strict failed (above): fix docs/ or mkdocs.yml" >&2; exit 1; }
rc=0
"$CI_DIR/venv/bin/pytest" "$@" || rc=$?
case $rc in
  0) ;;
  5) echo "tests/run.sh: pytest collected no tests: that is a failure" >&2; exit 1 ;;
  *) exit "$rc" ;;
esac
[ "$lint" = 0 ] || { echo "tests/run.sh: ruff found problems (above)" >&2; exit 1; }
