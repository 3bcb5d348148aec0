#!/usr/bin/env bash
# Stage what `benchmarks/gpu_check.py` needs on the lent GPU machine, which has PyTorch but no
# nnU-Net and no network: the wheels nnU-Net + this package need beyond that machine's stock image
# (Python 3.12, x86-64), pinned to the versions installed here so the GPU run uses what was tested
# here, and a copy of the AFIDs templates (../shared does not travel with the working tree).
#
#   scripts/gpu_wheels.sh            # -> gpu_wheels/*.whl and gpu_wheels/afids-templates/
#
# The folder is git-ignored and never committed; the device tool carries it (`carry: ["gpu_wheels"]`).
# Everything that travels (tree + carried paths) must stay under 64 MiB, so this fails above
# GPU_WHEELS_MAX_MIB (default 60). Environment: PYTHON (whose installed versions are pinned;
# default .venv/bin/python), GPU_WHEELS_DIR (default gpu_wheels), AFIDS_TEMPLATES (default
# ../shared/data/afids-templates).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEST=${GPU_WHEELS_DIR:-gpu_wheels}
TEMPLATES=${AFIDS_TEMPLATES:-../shared/data/afids-templates}
MAX_MIB=${GPU_WHEELS_MAX_MIB:-60}
TARGET_PY=3.12

# Needed beyond the GPU image (its package list: /work/.library/device/KINDS.md). Left out on
# purpose: graphviz, yacs (never imported on this path), imagecodecs (tifffile falls back without
# it; ~30 MB), importlib-resources (nibabel needs it on Python < 3.12 only), argparse (stdlib).
PACKAGES=(
  nnunetv2 dynamic-network-architectures acvl-utils batchgenerators batchgeneratorsv2
  SimpleITK nibabel connected-components-3d pynrrd
  blosc2 ndindex pydantic pydantic-core annotated-types typing-inspection typing-extensions
  future unittest2 traceback2 linecache2
)
# On the GPU image already (names as normalised by pip); requirements of the wheels above that are
# neither here nor downloaded make this script fail, so a new dependency is never missed silently.
ON_IMAGE="torch numpy scipy scikit-learn scikit-image pandas tifffile requests matplotlib seaborn einops
timm tqdm pillow threadpoolctl msgpack httpx rich packaging six imageio lazy-loader networkx filelock
jinja2 sympy fsspec pyyaml huggingface-hub safetensors torchvision"
IGNORED="graphviz yacs imagecodecs importlib-resources argparse"

[ -x "$PYTHON" ] || { echo "gpu_wheels.sh: $PYTHON not found (set PYTHON to the interpreter with nnunetv2 installed)" >&2; exit 2; }

pinned=()
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
    echo "gpu_wheels.sh: $name is not installed in $PYTHON's environment; install the project (scripts/setup.sh) first" >&2
    exit 2
  }
  pinned+=("$name==$version")
done

rm -rf "$DEST"
mkdir -p "$DEST"
echo "downloading ${#pinned[@]} packages for CPython $TARGET_PY x86-64 into $DEST/"
for spec in "${pinned[@]}"; do
  # a wheel for the GPU machine's Python and platform; else (sdist-only, e.g. acvl-utils) a wheel
  # built here, accepted only when it is pure Python (py3-none-any), which installs anywhere
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$DEST" "$spec" 2>/dev/null; then
    before=$(ls "$DEST")
    "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$spec" >/dev/null 2>"$DEST/.build.log" || {
      echo "gpu_wheels.sh: $spec: no cp$TARGET_PY x86-64 wheel and building one failed (is PyPI reachable" \
           "from here?):" >&2; tail -5 "$DEST/.build.log" >&2; exit 1
    }
    built=$(comm -13 <(echo "$before") <(ls "$DEST") | grep '\.whl$' || true)
    case "$built" in
      *-none-any.whl) echo "  built pure-Python $built" ;;
      *) echo "gpu_wheels.sh: $spec: no cp$TARGET_PY x86-64 wheel on the index and the one built here" \
              "($built) is not pure Python" >&2; exit 1 ;;
    esac
  fi
done
rm -f "$DEST/.build.log"

# every Requires-Dist (for Python 3.12, no extras) is downloaded, on the image, or knowingly ignored
"$PYTHON" - "$DEST" "$TARGET_PY" "$ON_IMAGE" "$IGNORED" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
dest, py, on_image, ignored = Path(sys.argv[1]), sys.argv[2], set(sys.argv[3].split()), set(sys.argv[4].split())
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(w.name.split("-")[0]) for w in dest.glob("*.whl")}
missing = []
for wheel in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        env = {"python_version": py, "python_full_version": py + ".0", "platform_machine": "x86_64",
               "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if norm(req.name) not in have | {norm(n) for n in on_image | ignored}:
            missing.append(f"{wheel.name} needs {req}")
if missing:
    sys.exit("gpu_wheels.sh: requirements neither downloaded nor on the GPU image:\n  " + "\n  ".join(missing)
             + "\nadd them to PACKAGES (or ON_IMAGE/IGNORED) in scripts/gpu_wheels.sh")
EOF

# SimpleITK alone is ~53 MB as deflate: recompress the large wheels' entries with LZMA (ZIP method 14).
# Same files, same RECORD hashes; pip reads wheels with Python's zipfile, which decompresses LZMA.
"$PYTHON" - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    if wheel.stat().st_size < 2 ** 20:
        continue
    packed = wheel.with_suffix(".lzma")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_LZMA
            dst.writestr(out, src.read(info))
    with zipfile.ZipFile(packed) as check:
        bad = check.testzip()
    if bad is not None:
        sys.exit(f"gpu_wheels.sh: recompressing {wheel.name} broke {bad}")
    before, after = wheel.stat().st_size, packed.stat().st_size
    if after < before:
        packed.replace(wheel)
        print(f"  recompressed {wheel.name}: {before / 2 ** 20:.1f} -> {after / 2 ** 20:.1f} MiB")
    else:
        packed.unlink()
EOF

if [ -d "$TEMPLATES/images" ]; then
  cp -r "$TEMPLATES" "$DEST/afids-templates"
  chmod -R u+w "$DEST/afids-templates"
else
  echo "gpu_wheels.sh: warning: $TEMPLATES not found; gpu_check.py will need --templates on the GPU machine" >&2
fi

ls -1 "$DEST"/*.whl | sed 's|.*/|  |'
total_kib=$(du -sk "$DEST" | cut -f1)
total_mib=$(awk "BEGIN {printf \"%.1f\", $total_kib / 1024}")
echo "total: $total_mib MiB in $DEST/ ($(ls "$DEST"/*.whl | wc -l) wheels + templates)"
if [ "$total_kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "gpu_wheels.sh: $DEST/ is $total_mib MiB, over the $MAX_MIB MiB limit (the device tool carries 64 MiB in all," \
       "working tree included); drop a package or set GPU_WHEELS_MAX_MIB" >&2
  exit 1
fi
