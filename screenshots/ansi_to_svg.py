#!/usr/bin/env python3
"""ANSI text (a captured terminal screen) to SVG, keeping colours and column alignment.

Usage: python3 screenshots/ansi_to_svg.py SRC.ans DST.svg COLS TITLE
Needs `rich` (pip install rich). `rsvg-convert` (Debian: librsvg2-bin) makes a PNG of it.
"""
import sys

from rich.console import Console
from rich.text import Text

src, dst, cols, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
text = open(src, encoding="utf-8").read().rstrip("\n")
console = Console(record=True, width=cols, force_terminal=True, color_system="truecolor",
                  file=open("/dev/null", "w"))
console.print(Text.from_ansi(text), soft_wrap=True)
svg = console.export_svg(title=name)
# Keep runs of spaces (SVG collapses them otherwise) so columns line up.
svg = svg.replace("<svg ", '<svg xml:space="preserve" ', 1)
open(dst, "w", encoding="utf-8").write(svg)
