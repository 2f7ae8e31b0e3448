#!/usr/bin/env bash
# Build llama.cpp's own llama-quantize, llama-imatrix and llama-server from the sources inside the
# llama-cpp-python sdist of the installed version (a PyPI package download, no git clone), so the
# tests can check that llama.cpp's tools read our imatrix files and agree with our numbers, and
# `lora2gguf serve` can run llama.cpp's own server (its `--jinja` chat template engine).
#
#   scripts/build_llama_tools.sh .venv/bin/python .cache/llama-tools   # -> .cache/llama-tools/bin/
#
# Same CPU flags as the llama-cpp-python build (GGML_NATIVE=OFF); static, CPU only.
set -euo pipefail
python=$1
out=$2
version=$("$python" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
cache=${LORA2GGUF_SDIST_CACHE:-$HOME/.cache/lora2gguf/sdist}
sdist="$cache/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache"
fi
if ! command -v cmake > /dev/null; then
    "$python" -m pip install -q cmake
    PATH="$(dirname "$python"):$PATH"
fi
mkdir -p "$out"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -xzf "$sdist" -C "$src"
cmake -S "$src/llama_cpp_python-$version/vendor/llama.cpp" -B "$out/build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON > "$out/cmake.log"
cmake --build "$out/build" --target llama-quantize llama-imatrix llama-server -j "$(nproc)" > "$out/build.log"
mkdir -p "$out/bin"
cp "$out/build/bin/llama-quantize" "$out/build/bin/llama-imatrix" "$out/build/bin/llama-server" "$out/bin/"
rm -rf "$out/build"
echo "llama.cpp tools of llama-cpp-python $version in $out/bin"
