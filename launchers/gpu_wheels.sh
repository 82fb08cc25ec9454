#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the GPU machine lacks, so the GPU check can run
# `flowpre train` under DeepSpeed there: it has no package index. Run here, where pip
# reaches PyPI; the GPU check installs them with --no-index --no-deps into /tmp/site.
#   bash launchers/gpu_wheels.sh            # then carry .whl with the device call
# Target: Python 3.12, x86-64 (the GPU image, /work/.library/device/KINDS.md). That image
# already holds torch, triton, numpy, pyyaml, pillow, safetensors, tqdm, einops, msgpack,
# ninja, psutil, packaging and py-cpuinfo, so only these travel (one version each: two of
# one package stop the whole install):
#   deepspeed (an sdist on PyPI: built here as a py3-none-any wheel with its ops left to
#   JIT, DS_BUILD_OPS=0; the client optimizer is torch's AdamW, so no op is ever built),
#   its hjson and pydantic (+ pydantic-core, annotated-types, typing-inspection, and
#   typing-extensions because this pydantic-core needs >= 4.16 and the image's version is
#   not known), and webdataset with braceexpand for the data pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
DEST=.whl
PINS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7)
DEEPSPEED=deepspeed==0.19.8

rm -rf "$DEST" && mkdir -p "$DEST"
# pip matches manylinux_2_N exactly, so name every N the wheels are published for
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
# The build imports torch (deepspeed's setup.py asks it for versions) and needs no GPU; the
# CPU accelerator it records only concerns prebuilt ops, and there are none.
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED" 2> >(grep -v "is ignored: it is neither" >&2)

# every requirement of what travels is either travelling or in the image
python3 - "$DEST" <<'EOF'
import re, sys, zipfile, pathlib
dest = pathlib.Path(sys.argv[1])
IN_IMAGE = {"torch", "triton", "numpy", "pyyaml", "pillow", "safetensors", "tqdm", "einops", "msgpack", "ninja",
            "psutil", "packaging", "py-cpuinfo"}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wheels = sorted(dest.glob("*.whl"))
from packaging.requirements import Requirement
versions = {norm(w.name.split("-")[0]): w.name.split("-")[1] for w in wheels}
assert len(versions) == len(wheels), "two versions of one package"
missing = []
for w in wheels:
    meta = next(n for n in zipfile.ZipFile(w).namelist() if n.endswith(".dist-info/METADATA"))
    for line in zipfile.ZipFile(w).read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1])
            name = norm(req.name)
            if req.marker and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue
            if name in versions and not req.specifier.contains(versions[name], prereleases=True):
                missing.append(f"{w.name} needs {req}, carries {versions[name]}")
            elif name not in versions and name not in IN_IMAGE:
                missing.append(f"{w.name} needs {req}")
assert not missing, "\n".join(missing)
tags = [w.name for w in wheels if not (w.name.endswith("-none-any.whl") or "cp312" in w.name)]
assert not tags, f"built for neither any Python nor CPython 3.12: {tags}"
print(f"{len(wheels)} wheels, every requirement met by them or the GPU image")
EOF
ls -1 "$DEST"
du -sh "$DEST"
