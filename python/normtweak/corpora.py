"""English text that Debian packages ship, for calibration and perplexity.

Jane Austen's six novels (r-cran-janeaustenr) and Moby Dick (r-cran-tokenizers)
are stored as R lazy-load databases (data/Rdata.rdx + Rdata.rdb); this module
reads them with the `rdata` parser, no R needed. `make data` unpacks the two
.deb files into .data/ (apt-get download + dpkg -x, nothing installed).
"""

from __future__ import annotations

import os
import zlib
from functools import lru_cache
from pathlib import Path

TEXTS = {
    "emma": "janeaustenr",
    "mansfieldpark": "janeaustenr",
    "northangerabbey": "janeaustenr",
    "persuasion": "janeaustenr",
    "prideprejudice": "janeaustenr",
    "sensesensibility": "janeaustenr",
    "mobydick": "tokenizers",
}


def _roots() -> list[Path]:
    roots = []
    if os.environ.get("NORMTWEAK_DATA"):
        roots.append(Path(os.environ["NORMTWEAK_DATA"]))
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / ".data").is_dir():
            roots.append(parent / ".data" / "usr" / "lib" / "R" / "site-library")
            break
    roots.append(Path("/usr/lib/R/site-library"))
    return roots


def _package_dir(pkg: str) -> Path:
    for root in _roots():
        d = root / pkg / "data"
        if (d / "Rdata.rdx").exists():
            return d
    raise ValueError(
        f"the R package data {pkg!r} was not found; run `make data` (unpacks Debian's r-cran-{pkg}) or set "
        "NORMTWEAK_DATA to a folder holding <pkg>/data/Rdata.rdx"
    )


@lru_cache(maxsize=None)
def english_text(name: str) -> str:
    """The full text of one of TEXTS (e.g. "emma", "persuasion", "mobydick")."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of {', '.join(TEXTS)}")
    import warnings

    import rdata

    d = _package_dir(TEXTS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the index file has no RDS header
        index = rdata.conversion.convert(rdata.parser.parse_data((d / "Rdata.rdx").read_bytes()))
        off, length = (int(v) for v in index["variables"][name][:2])
        with open(d / "Rdata.rdb", "rb") as fh:
            fh.seek(off)
            blob = fh.read(length)
        # Each object: 4-byte big-endian uncompressed length, then zlib data.
        obj = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
    lines = [str(s) for s in list(obj)]
    text = "\n".join(lines).replace("\r\n", "\n").lstrip("\ufeff")
    return text
