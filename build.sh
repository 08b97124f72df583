#!/usr/bin/env bash
# Seal's one entry point.
#   ./build.sh serve   build the page and serve it on http://127.0.0.1:${PORT:-8080}/
#   ./build.sh wasm    build the page's wasm module into dist/
#   ./build.sh test    install what is missing, then run every test (native and in headless Chromium)
#   ./build.sh bench   time models, generation and sealing on the CPU backend -> bench-results/bench.json, real-size*.json
#   ./build.sh ablate  judge the seal's recipes on the validation suite -> bench-results/ablation-suite.json
# Builds and tools are cached outside the clone, in ${SEAL_CACHE:-~/.cache/seal}.
set -euo pipefail
cd "$(dirname "$0")"

CACHE="${SEAL_CACHE:-$HOME/.cache/seal}"
TOOLS="$CACHE/tools"
export CARGO_TARGET_DIR="$CACHE/target"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
WASM_TARGET=wasm32-unknown-unknown

log() { echo "build.sh: $*" >&2; }

# phase NAME COMMAND...: runs COMMAND and reports how long it took.
phase() {
  local name=$1 start=$SECONDS
  shift
  "$@"
  log "$name: $((SECONDS - start)) s"
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_chromium() {
  [ -x /usr/bin/chromium ] && return
  log "installing Debian's chromium and chromium-driver"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
}

install_lint_tools() {
  local have
  have=$(rustup component list --installed)
  for c in rustfmt clippy; do grep -q "^$c" <<<"$have" || rustup component add "$c"; done
}

# clippy's lints and every warning as errors, as the workspace's crates compile, natively and
# for the page's wasm32 build (its WebGPU and Blob code compiles only there): see .ci/lint-rustc.
# The tests' builds and `cargo test` share it, so nothing is compiled twice.
lint_as_built() {
  export RUSTC_WORKSPACE_WRAPPER="$PWD/.ci/lint-rustc"
}

install_wasm_target() {
  rustup target list --installed | grep -qx "$WASM_TARGET" || rustup target add "$WASM_TARGET"
}

# wasm-bindgen-cli must be exactly the wasm-bindgen version in Cargo.lock.
# No --locked: the registry mirror lacks some of its locked dependencies (see TOOLCHAIN.md).
install_wasm_bindgen() {
  local version
  version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
  if [ "$("$TOOLS/bin/wasm-bindgen" --version 2>/dev/null)" != "wasm-bindgen $version" ]; then
    log "installing wasm-bindgen-cli $version into $TOOLS (a few minutes, once)"
    # Not linted as our own crates are (cargo counts the installed package as the workspace).
    env -u RUSTC_WORKSPACE_WRAPPER cargo install --quiet wasm-bindgen-cli --version "$version" --root "$TOOLS"
  fi
}

install_playwright() {
  # Only playwright-core (no browser download); reinstall when the lock file changes.
  if ! cmp -s package-lock.json node_modules/.seal-installed-lock; then
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.seal-installed-lock
  fi
}

# The page's module: seal-web for wasm32 in the size profile, then the JS glue into dist/. It has
# a target dir of its own: cargo locks a target dir for a whole build, and apart from the native
# one it can build beside it (its single-unit LTO alone keeps one core busy for minutes).
build_wasm() {
  local target_dir="$CACHE/target-wasm"
  CARGO_TARGET_DIR="$target_dir" cargo build --quiet -p seal-web --target "$WASM_TARGET" --profile wasm
  "$TOOLS/bin/wasm-bindgen" --target web --no-typescript --remove-name-section \
    --remove-producers-section --out-dir dist "$target_dir/$WASM_TARGET/wasm/seal_web.wasm"
  log "dist/seal_web_bg.wasm: $(stat -c %s dist/seal_web_bg.wasm) bytes," \
    "$(gzip -9 -c dist/seal_web_bg.wasm | wc -c) gzipped"
}

# The module once the wasm32 target is installed (which is not done beside another build).
wasm_module() {
  phase "wasm-bindgen-cli" install_wasm_bindgen
  phase "wasm build" build_wasm
}

cmd_wasm() {
  phase "rust wasm target" install_wasm_target
  wasm_module
}

cmd_serve() {
  cmd_wasm
  exec python3 web/serve.py --port "${PORT:-8080}"
}

# suite NAME COMMAND...: runs a test suite; a failure is recorded and the next suite still runs.
FAILED=()
suite() {
  local name=$1 start=$SECONDS
  shift
  if "$@"; then
    log "$name: passed in $((SECONDS - start)) s"
  else
    log "$name: FAILED after $((SECONDS - start)) s"
    FAILED+=("$name")
  fi
}

cmd_test() {
  local start=$SECONDS
  trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
  phase "chromium" install_chromium
  phase "playwright-core" install_playwright
  phase "lint tools" install_lint_tools
  phase "rust wasm target" install_wasm_target
  lint_as_built
  # The page's module builds beside the native targets (see build_wasm).
  wasm_module &
  local wasm=$!
  # Every native target at once: the CLI the browser tests drive and the test binaries share one
  # feature resolution, so `cargo test` builds nothing again (built apart, the dependencies were
  # compiled twice: ~7 min of a cold run).
  phase "native build and lints" cargo build --quiet --workspace --all-targets
  wait "$wasm" || { log "the page's wasm build (or its lints) FAILED"; exit 1; }
  export SEAL_BIN="$CARGO_TARGET_DIR/debug/seal"
  # The browser tests keep about one core busy (the page's CPU engine is single-threaded wasm),
  # so they run beside lint and the native tests; their output follows when they end.
  local browser_log
  browser_log=$(mktemp)
  (suite "browser tests" node --test tests/ && [ ${#FAILED[@]} -eq 0 ]) >"$browser_log" 2>&1 &
  local browser=$!
  suite "rustfmt" cargo fmt --check
  suite "native tests" cargo test --quiet --workspace --no-fail-fast
  wait "$browser" || FAILED+=("browser tests")
  cat "$browser_log"
  rm -f "$browser_log"
  if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED: ${FAILED[*]} ($((SECONDS - start)) s)"
    exit 1
  fi
  log "all tests passed in $((SECONDS - start)) s"
}

# Speed numbers come from the release profile (the tests' dev profile keeps our own crates at
# opt-level 1); needs ../shared/fixtures beside the clone.
cmd_bench() {
  phase "release cli" cargo build --quiet --release -p seal-cli
  "$CARGO_TARGET_DIR/release/seal" bench --fixtures ../shared/fixtures --out bench-results/bench.json
  "$CARGO_TARGET_DIR/release/seal" bench --fixtures ../shared/fixtures --real-size bk_sdm_tiny --batches 1,4 --sides 128,256 \
    --out bench-results/real-size.json
  "$CARGO_TARGET_DIR/release/seal" bench --fixtures ../shared/fixtures --real-size bk_sdm_small,sd15 --batches 1 --sides 128,256 \
    --out bench-results/real-size-sd.json
  # f16 weights computing in f16, beside real-size.json's f32 row of the same configuration.
  "$CARGO_TARGET_DIR/release/seal" bench --fixtures ../shared/fixtures --real-size bk_sdm_tiny --batches 1 --sides 128 --weights f16 \
    --out bench-results/real-size-f16.json
}

# The seal's recipes on the validation suite (planted models made once into $SEAL_CACHE/suite).
cmd_ablate() {
  phase "release cli" cargo build --quiet --release -p seal-cli
  "$CARGO_TARGET_DIR/release/seal" ablate --suite --fixtures ../shared/fixtures --out bench-results/ablation-suite.json
}

case "${1:-}" in
  serve) cmd_serve ;;
  bench) cmd_bench ;;
  ablate) cmd_ablate ;;
  wasm) cmd_wasm ;;
  test) cmd_test ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
