"""Writing a file so that no reader ever sees half of it: write a temporary file beside it, then rename;
and the bundle's JSON layout (``json_text``, ``write_json``).

``os.replace`` within one folder is atomic on POSIX and Windows, so the final name holds either the previous
complete file or the new complete one. A failed or interrupted write removes its temporary file when it can;
a killed process leaves ``.<name>.<pid>.tmp<suffix>``, never a file under the final name.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, rename it to ``path``.

    Args:
        path: the final file; its folder is created if needed.
        suffix: ending of the temporary name, for writers that choose the format by extension (e.g.
            ``".png"`` for Pillow, ``".nii.gz"`` for nibabel).

    Example::

        with atomic_output("out/report.json") as temp:
            temp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")  # the form _TEMPORARY_NAME reads
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


_TEMPORARY_NAME = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>.*)$")


def leftover_temporaries(folder: str | os.PathLike, final_names: str = "*") -> list[tuple[Path, int]]:
    """The temporary files ``atomic_output`` left in ``folder`` (a killed writer's), oldest name first.

    Args:
        folder: where to look (a missing folder has none).
        final_names: glob the final file names must match, e.g. ``"*.npy"``.

    Returns:
        ``(temporary path, pid of the process that wrote it)`` for each, sorted by name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.match(path.name)
        if match and fnmatch.fnmatchcase(match.group("final"), final_names):
            found.append((path, int(match.group("pid"))))
    return found


_NUMBER_LIST = re.compile(r"\[\s+([-+0-9.eE,\s]+?)\s+\]")


def json_text(content) -> str:
    """JSON indented one space per level, with lists of numbers (boxes, sizes) kept on one line.

    NaN/inf are refused (``allow_nan=False``): strict JSON readers reject them.
    """
    text = json.dumps(content, indent=1, allow_nan=False)
    return _NUMBER_LIST.sub(lambda match: "[" + " ".join(match.group(1).split()) + "]", text)


def write_json(path: str | os.PathLike, content) -> Path:
    """Write ``json_text(content)`` atomically (temporary file beside it, then rename): a reader never sees
    half a file. Returns the path.
    """
    path = Path(path)
    with atomic_output(path) as temp:
        temp.write_text(json_text(content) + "\n", encoding="utf-8")
    return path
