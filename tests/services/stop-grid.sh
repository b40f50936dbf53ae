#!/bin/bash
# stop-grid.sh [rucio|xrootd] - stop what start-grid.sh started, by PID only (Apache's master,
# xrootd); both without an argument. Data, certificates and the proxy stay.
set -u
BASE=${GRID_BASE:-${DAC_CI_DIR:-/tmp/dac-upload-ci}/grid}
what=${1:-all}

stop_pid() {  # stop_pid NAME PID
  local name=$1 pid=$2 i
  kill -0 "$pid" 2>/dev/null || { echo "$name (pid $pid) not running"; return 0; }
  kill -TERM "$pid"
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || { echo "$name (pid $pid) stopped"; return 0; }; sleep 0.1; done
  echo "$name (pid $pid) still alive after 10 s, sending KILL"; kill -KILL "$pid"
}
if [ "$what" != xrootd ]; then
  if p=$(cat "$BASE/apache/run/httpd.pid" 2>/dev/null); then stop_pid httpd "$p"; else echo "no httpd.pid"; fi
fi
if [ "$what" != rucio ]; then
  if p=$(cat "$BASE/xrootd/run/dacgrid/xrootd.pid" 2>/dev/null); then stop_pid xrootd "$p"; else echo "no xrootd.pid"; fi
fi
