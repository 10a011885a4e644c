#!/usr/bin/env python3
"""Makes the icon-theme development set of issue 18: the same icon names drawn in different
styles by Debian's icon themes, as 64 x 64 RGBA PNGs, OUT/<theme>/<name>.png, for names that
at least two themes draw (colour icons only: symbolic icons are one monochrome style).

    apt-get install adwaita-icon-theme papirus-icon-theme breeze-icon-theme \
        oxygen-icon-theme librsvg2-bin
    pip install pillow
    python3 scripts/icon-set.py target/icon-set

The themes' licences (GPL/LGPL/CC-BY-SA) do not fit the repository's MIT/Apache, so the set is
made on the machine, not shipped. PNG sizes are used where a theme has them (the largest of at
least 48 px, resized with Lanczos); SVGs are rendered at 64 px with rsvg-convert.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

THEMES = {
    "adwaita": "/usr/share/icons/Adwaita",
    "papirus": "/usr/share/icons/Papirus",
    "breeze": "/usr/share/icons/breeze",
    "oxygen": "/usr/share/icons/oxygen",
}
SIDE = 64


def size_of(path: Path) -> int:
    """The icon size a path's folders name (64x64, 48, base/64x64), or 0 (scalable)."""
    for part in reversed(path.parts):
        m = re.fullmatch(r"(\d+)(?:x\d+)?(?:@2x)?", part)
        if m:
            return int(m.group(1)) * (2 if part.endswith("@2x") else 1)
    return 0


def candidates(root: str):
    """name -> the best file of a theme: the largest PNG of 48 px or more, else the largest
    SVG (a scalable one counts as large)."""
    best = {}
    for dirpath, _, files in os.walk(root, followlinks=False):
        if "symbolic" in dirpath or "scalable-up-to-32" in dirpath:
            continue
        for f in files:
            if "symbolic" in f or not f.endswith((".png", ".svg")):
                continue
            p = Path(dirpath) / f
            if not p.exists():  # a dangling link
                continue
            size = size_of(p.relative_to(root))
            is_svg = f.endswith(".svg")
            if not is_svg and size < 48:
                continue
            # Rank: PNGs of 48+ first by size, then SVGs (scalable = 1000) by size.
            rank = (0 if is_svg else 1, size if size else 1000)
            name = f.rsplit(".", 1)[0]
            if name not in best or rank > best[name][0]:
                best[name] = (rank, p)
    return {n: p for n, (_, p) in best.items()}


def render(src: Path, dst: Path) -> bool:
    try:
        if src.suffix == ".svg":
            tmp = dst.with_suffix(".tmp.png")
            subprocess.run(
                ["rsvg-convert", "-w", str(SIDE), "-h", str(SIDE), "-o", str(tmp), str(src)],
                check=True,
                capture_output=True,
                timeout=20,
            )
            img = Image.open(tmp).convert("RGBA")
            tmp.unlink()
        else:
            img = Image.open(src).convert("RGBA")
        if img.size != (SIDE, SIDE):
            img.thumbnail((SIDE, SIDE), Image.LANCZOS)
            canvas = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
            canvas.paste(img, ((SIDE - img.width) // 2, (SIDE - img.height) // 2))
            img = canvas
        img.save(dst)
        return True
    except Exception as e:  # a broken file in a theme: skip it, say so
        print(f"skipped {src}: {e}", file=sys.stderr)
        return False


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    found = {t: candidates(root) for t, root in THEMES.items() if os.path.isdir(root)}
    missing = sorted(set(THEMES) - set(found))
    if missing:
        sys.exit(f"missing themes: {', '.join(missing)} (see the apt-get line in the docstring)")
    counts = {}
    for files in found.values():
        for n in files:
            counts[n] = counts.get(n, 0) + 1
    names = sorted(n for n, c in counts.items() if c >= 2)
    made = {t: 0 for t in found}
    for t, files in found.items():
        (out / t).mkdir(parents=True, exist_ok=True)
        for n in names:
            if n in files and render(files[n], out / t / f"{n}.png"):
                made[t] += 1
    print(f"{len(names)} icon names drawn by two or more themes; images per theme: "
          + ", ".join(f"{t} {made[t]}" for t in sorted(made)))


if __name__ == "__main__":
    main()
