#!/usr/bin/env python3
"""Capture the dashboard of a real sweep as ANSI text files, without tmux.

Usage:
  python3 scripts/gpu_screens.py BIN PROFILE DB OUT_DIR [COLSxROWS]

Runs ``BIN run PROFILE --db DB`` in a pseudo-terminal (python's ``pty``) of COLSxROWS
(default 120x36) and keeps a terminal emulator (``pyte``, pure python: carry its wheel and
``wcwidth``'s to the GPU machine) fed with what the dashboard draws. It writes, as ANSI text
(SGR colours, one line per terminal row) that ``screenshots/ansi_to_svg.py`` turns into an image:

  OUT_DIR/gpu-dashboard.ans  the start view once a run reports timed steps (queue + live panel)
  OUT_DIR/gpu-live.ans       view 2 (gauges: tokens/s, VRAM, power) a moment later
  OUT_DIR/gpu-table.ans      view 3 (the comparison table) when the header says FINISHED
  OUT_DIR/gpu-chart.ans      view 4 (Pareto plot and bars)

then presses ``q``. Exit status 1 when a screen never appeared (the others are still written).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time

import pyte

NAMED = {"black": 0, "red": 1, "green": 2, "brown": 3, "yellow": 3, "blue": 4,
         "magenta": 5, "cyan": 6, "white": 7}


def sgr_colour(c: str, fg: bool) -> str:
    """pyte's colour name or hex to an SGR parameter ('' for the default)."""
    if c == "default":
        return ""
    base = 30 if fg else 40
    if c.startswith("bright"):
        n = NAMED.get(c[6:], 7)
        return str(base + 60 + n)
    if c in NAMED:
        return str(base + NAMED[c])
    if len(c) == 6:
        try:
            r, g, b = int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
        except ValueError:
            return ""
        return f"{38 if fg else 48};2;{r};{g};{b}"
    return ""


def screen_ansi(screen: pyte.Screen) -> str:
    """The screen as ANSI text: one line per row, SGR before every change of style."""
    out = []
    for y in range(screen.lines):
        row = screen.buffer[y]
        line, last = [], None
        for x in range(screen.columns):
            ch = row[x]
            style = (ch.fg, ch.bg, ch.bold, ch.reverse, ch.underscore)
            if style != last:
                params = ["0"]
                fg, bg = sgr_colour(ch.fg, True), sgr_colour(ch.bg, False)
                if ch.reverse:
                    fg, bg = (sgr_colour(ch.bg, True) or "30"), (sgr_colour(ch.fg, False) or "47")
                params += [p for p in (fg, bg) if p]
                if ch.bold:
                    params.append("1")
                if ch.underscore:
                    params.append("4")
                line.append("\x1b[" + ";".join(params) + "m")
                last = style
            line.append(ch.data or " ")
        out.append("".join(line) + "\x1b[0m")
    return "\n".join(out) + "\n"


def text(screen: pyte.Screen) -> str:
    return "\n".join(screen.display)


def main(argv: list[str]) -> int:
    if len(argv) not in (5, 6):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    binary, profile, db, out = argv[1:5]
    cols, rows = (int(v) for v in (argv[5] if len(argv) == 6 else "120x36").split("x"))
    os.makedirs(out, exist_ok=True)
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.environ["TERM"] = "xterm-256color"
        os.execv(binary, [binary, "run", profile, "--db", db])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    class Screen(pyte.Screen):
        # Answer the terminal's queries (cursor position, device attributes) as a terminal would.
        def write_process_input(self, data: str) -> None:
            os.write(fd, data.encode())

    screen = Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    alive = True

    def pump(seconds: float) -> None:
        nonlocal alive
        end = time.time() + seconds
        while alive and time.time() < end:
            r, _, _ = select.select([fd], [], [], 0.05)
            if r:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    alive = False
                    break
                stream.feed(data)

    def wait_for(pred, timeout: float) -> bool:
        end = time.time() + timeout
        while alive and time.time() < end:
            pump(0.2)
            if pred(text(screen)):
                return True
        return False

    def shot(name: str) -> None:
        with open(os.path.join(out, name + ".ans"), "w", encoding="utf-8") as f:
            f.write(screen_ansi(screen))
        print(f"wrote {name}.ans", flush=True)

    missing = []
    # A run past its warm-up: the live panel shows a step count and tokens/s.
    if wait_for(lambda t: "loss scale" in t and "tok/s" in t, 300):
        pump(3)
        shot("gpu-dashboard")
        os.write(fd, b"2")
        pump(2)
        shot("gpu-live")
    else:
        missing.append("live")
        shot("gpu-dashboard")
    if wait_for(lambda t: "FINISHED" in t.splitlines()[0], 900):
        os.write(fd, b"3")
        pump(1.5)
        shot("gpu-table")
        os.write(fd, b"4")
        pump(1.5)
        shot("gpu-chart")
    else:
        missing.append("finished")
    os.write(fd, b"q")
    pump(5)
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    if missing:
        print("never appeared: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
