#!/usr/bin/env bash
# UI overhead: tokens/s of the quick-start sweep with the dashboard (in a tmux pane) vs
# --headless, alternating, N repeats each. Prints one line per sweep: mode, then tokens/s of
# each of the 4 points, then their mean.
# Usage: scripts/ui_overhead.sh [N] [lorascope binary]
set -euo pipefail
n="${1:-3}"
bin="$(realpath "${2:-target/release/lorascope}")"
work="$(mktemp -d)"
trap 'tmux kill-session -t ui-bench-$$ 2>/dev/null || true; rm -rf "$work"' EXIT
tps() { # db -> "p1 p2 p3 p4 mean"
  "$bin" report --db "$1" --format csv | awk -F, 'NR>1 {printf "%.1f ", $7; s+=$7; k++} END {printf "mean %.1f\n", s/k}'
}
for i in $(seq 1 "$n"); do
  "$bin" run --headless --db "$work/h$i.db" > /dev/null 2>&1
  echo "headless  $(tps "$work/h$i.db")"
  tmux new-session -d -s "ui-bench-$$" -x 100 -y 30 "'$bin' run --db '$work/d$i.db'; sleep 60"
  sleep 2
  until tmux capture-pane -p -t "ui-bench-$$" | head -1 | grep -q FINISHED; do sleep 0.5; done
  tmux send-keys -t "ui-bench-$$" q; sleep 1
  tmux kill-session -t "ui-bench-$$" 2>/dev/null || true
  echo "dashboard $(tps "$work/d$i.db")"
done
