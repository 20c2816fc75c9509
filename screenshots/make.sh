#!/usr/bin/env bash
# Re-creates the dashboard screenshots in this folder from a real quick-start sweep.
#
# Needs: tmux, python3 with `rich` (pip install rich), rsvg-convert (Debian: librsvg2-bin).
# How: the sweep runs in a detached tmux session; `tmux capture-pane -e` keeps the ANSI
# colours; rich turns the ANSI text into SVG; rsvg-convert makes the PNG.
# Usage: screenshots/make.sh            (from anywhere; builds the debug binary first)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
target="${CARGO_TARGET_DIR:-$repo/target}"
(cd "$repo" && cargo build --quiet)
bin="$target/debug/lorascope"
work="$(mktemp -d)"
session="lorascope-shots-$$"
cleanup() { tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# The quick-start grid with more steps, so the views can be caught mid-run.
sed 's/^steps = 30/steps = 300/' "$repo/profiles/quickstart.toml" > "$work/quickstart.toml"

shot() { # name: capture the pane with colours, render to PNG
  local name="$1"
  tmux capture-pane -e -p -t "$session" > "$work/$name.ans"
  local cols
  cols="$(tmux display -p -t "$session" '#{pane_width}')"
  python3 "$here/ansi_to_svg.py" "$work/$name.ans" "$work/$name.svg" "$cols" "lorascope run — $name"
  rsvg-convert -o "$here/$name.png" "$work/$name.svg"
  echo "wrote screenshots/$name.png"
}

tmux new-session -d -s "$session" -x 120 -y 36 \
  "cd '$work' && '$bin' run quickstart.toml --db '$work/shots.db'; sleep 30"
sleep 8
shot dashboard-120x36          # queue + live panel (+ table once runs finish)
tmux send-keys -t "$session" 2; sleep 1
shot live
tmux send-keys -t "$session" '?'; sleep 1
shot help
tmux send-keys -t "$session" x 1; sleep 1
# Wait for the sweep to finish (the header says FINISHED).
for _ in $(seq 1 300); do
  tmux capture-pane -p -t "$session" | head -1 | grep -q FINISHED && break
  sleep 1
done
tmux send-keys -t "$session" 3 Right; sleep 1
shot table
tmux send-keys -t "$session" j Enter; sleep 1
shot detail
tmux resize-window -t "$session" -x 80 -y 24; sleep 0.5
tmux send-keys -t "$session" 1; sleep 1
shot queue-80x24
tmux send-keys -t "$session" q
