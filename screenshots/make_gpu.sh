#!/usr/bin/env bash
# Renders the screens of a real GPU sweep and its HTML report into this folder.
#
# On the GPU machine, `PART=round bash scripts/gpu_sitting.sh` runs profiles/rtx4060-three.toml
# in a pseudo-terminal (scripts/gpu_screens.py, python's pty + pyte) and writes the captured
# screens (gpu-*.ans) and the sweep's database (screens.db) under $OUT/screens. Bring that folder
# back, then here:
#   screenshots/make_gpu.sh DIR [LORASCOPE]
# Needs: python3 with `rich`, rsvg-convert (Debian: librsvg2-bin), chromium (for report-html.png).
# Writes: gpu-dashboard.png, gpu-live.png, gpu-table.png, gpu-chart.png (120x36 screens) and
# report-html.png (the top of `lorascope report --format html` of that database, 1280 px wide).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
dir="${1:?usage: screenshots/make_gpu.sh DIR [LORASCOPE]}"
bin="${2:-${CARGO_TARGET_DIR:-$repo/target}/debug/lorascope}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for ans in "$dir"/gpu-*.ans; do
  name="$(basename "$ans" .ans)"
  python3 "$here/ansi_to_svg.py" "$ans" "$work/$name.svg" 120 "lorascope run — $name (H200, rtx4060-three)"
  rsvg-convert -o "$here/$name.png" "$work/$name.svg"
  echo "wrote screenshots/$name.png"
done
"$bin" report --db "$dir/screens.db" --format html --out "$work/report.html"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1600 \
  --screenshot="$here/report-html.png" "file://$work/report.html" 2>/dev/null
echo "wrote screenshots/report-html.png"
