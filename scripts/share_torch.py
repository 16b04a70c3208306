"""Let a second virtual environment use the main one's PyTorch instead of installing its own copy.

Usage: python scripts/share_torch.py MAIN_VENV_PYTHON LINK_DIR
(run by scripts/setup_monailabel.sh; prints LINK_DIR when it made the links, nothing when it could not).

torch 2.14.1 with its CUDA libraries (nvidia-*, cuda-*, triton) is about 5.3 GB of a venv, and MONAI Label's
venv pins the same torch and torchvision builds as the main one. This makes LINK_DIR hold symbolic links to
those distributions' top-level folders and their .dist-info in the main venv, and nothing else (not numpy,
which the two venvs pin differently); a ``.pth`` file naming LINK_DIR then lets the second venv import them,
and its pip sees them installed and leaves them alone (LINK_DIR lies outside that venv, so pip never removes
them). LINK_DIR must lie inside the main venv, so that deleting the main venv deletes the links with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SHARED = ("torch", "torchvision")
# Requirements of the shared distributions that come along: the heavy CUDA part, none of the small pure-Python
# ones (sympy, jinja2 ...), which the second venv installs at the versions it resolves itself.
COME_ALONG = ("triton", "cuda-", "cuda_", "nvidia-", "nvidia_")

LISTING = r"""
import importlib.metadata as md, json, re, sys
shared, come_along = json.loads(sys.argv[1])
def name(dist): return dist.metadata["Name"].lower().replace("_", "-")
by_name = {name(d): d for d in md.distributions()}
todo, seen, entries = list(shared), set(), set()
while todo:
    wanted = todo.pop()
    dist = by_name.get(wanted)
    if dist is None or wanted in seen:
        continue
    seen.add(wanted)
    for line in dist.files or []:
        top = line.parts[0]
        if top != ".." and not top.startswith("__"):
            entries.add(str(dist.locate_file(top)))
    for requirement in dist.requires or []:
        # Extras count too: torch asks for cuda-toolkit[cudart, cublas, ...], whose parts are marked by extra.
        required = re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if required.startswith(tuple(c.replace("_", "-") for c in come_along)):
            todo.append(required)
print(json.dumps({"found": sorted(seen), "entries": sorted(entries)}))
"""


def main(main_python: str, link_dir: str) -> int:
    listing = subprocess.run([main_python, "-c", LISTING, json.dumps([SHARED, COME_ALONG])],
                             capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        return 0
    found = json.loads(listing.stdout)
    if not set(SHARED) <= set(found["found"]):
        return 0  # the main venv has no torch to share: the second venv installs its own
    links = Path(link_dir)
    links.mkdir(parents=True, exist_ok=True)
    for entry in map(Path, found["entries"]):
        link = links / entry.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(entry)
    print(links)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
