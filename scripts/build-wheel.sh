#!/usr/bin/env bash
# Builds what `pip install asymlora` needs on Linux, into OUTDIR:
#   - an abi3 wheel (one wheel for CPython >= 3.9) for manylinux2014 (manylinux_2_17)
#     of this machine's architecture, linked by zig against glibc 2.17 symbols, so it
#     runs on any Linux with glibc >= 2.17 whatever glibc this machine has;
#   - the sdist (`maturin sdist`), from which pip builds a wheel where cargo exists.
# Then checks the wheel: its tag, its version (the Cargo workspace version), that the
# extension needs no glibc symbol newer than GLIBC_2.17 (objdump -T), and
# `auditwheel show` when auditwheel is in the build venv.
#
# Usage: bash scripts/build-wheel.sh OUTDIR [--check-sdist]
#   --check-sdist  also builds a wheel from the sdist from scratch (`pip wheel` in an
#                  empty folder, a fresh cargo target dir): a second full release build.
# Environment:
#   VENV              build virtualenv (default target/wheel-venv); maturin and ziglang
#                     are installed into it when missing (auditwheel too, into the
#                     default one).
#   PYTHON            interpreter that creates the build virtualenv (default python3).
#   CARGO_TARGET_DIR  cargo's build folder (default target/wheel: a rebuild is incremental).
#   TARGET            a Rust target triple to cross-build for (e.g.
#                     aarch64-unknown-linux-gnu, after `rustup target add` it); default
#                     this machine's.
# Wheels for macOS and Windows are built by .github/workflows/release.yml.
set -euo pipefail

usage() {
    echo "usage: bash scripts/build-wheel.sh OUTDIR [--check-sdist]" >&2
    exit 2
}
OUTDIR=""
CHECK_SDIST=0
for arg in "$@"; do
    case "$arg" in
        --check-sdist) CHECK_SDIST=1 ;;
        -h | --help) usage ;;
        -*) echo "build-wheel.sh: unknown option $arg" >&2; usage ;;
        *) [ -z "$OUTDIR" ] || usage; OUTDIR="$arg" ;;
    esac
done
[ -n "$OUTDIR" ] || usage

die() {
    echo "build-wheel.sh: error: $*" >&2
    exit 1
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ "$(uname -s)" = Linux ] || die "builds manylinux wheels on Linux only (see .github/workflows/release.yml for the others)"
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup)"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

# The one version source: [workspace.package] version in Cargo.toml.
VERSION="$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)"
[ -n "$VERSION" ] || die "no [workspace.package] version in Cargo.toml"

# ---------------------------------------------------------------- build virtualenv
DEFAULT_VENV="$ROOT/target/wheel-venv"
VENV="${VENV:-$DEFAULT_VENV}"
mkdir -p "$ROOT/target"
setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating the build virtualenv $VENV"
        "${PYTHON:-python3}" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    local want=("maturin>=1.9.4,<2" "ziglang>=0.10")
    [ "$VENV" = "$DEFAULT_VENV" ] && want+=("auditwheel>=6")
    # Installs nothing when all are there already.
    "$VENV/bin/python" -m pip install --quiet "${want[@]}"
}
# Two builds at once (say, two test runs) must not install into one venv together.
if command -v flock >/dev/null; then
    exec 9>"$ROOT/target/.wheel-venv.lock"
    flock 9
    setup_venv
    exec 9>&-
else
    setup_venv
fi
MATURIN="$VENV/bin/maturin"
"$MATURIN" --version
"$VENV/bin/python" -m ziglang version | sed 's/^/zig /'

# ---------------------------------------------------------------- build
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/wheel}"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/asymlora-wheel.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
TARGET_ARGS=()
if [ -n "${TARGET:-}" ]; then
    TARGET_ARGS=(--target "$TARGET")
fi
echo "==> maturin build --release --zig --compatibility manylinux2014 ${TARGET_ARGS[*]} (cargo target dir $CARGO_TARGET_DIR)"
# maturin runs zig through `python -m ziglang`: put the venv first on PATH.
PATH="$VENV/bin:$PATH" "$MATURIN" build --release --zig --compatibility manylinux2014 \
    "${TARGET_ARGS[@]}" --out "$STAGE/wheel"
echo "==> maturin sdist"
"$MATURIN" sdist --out "$STAGE/sdist"

shopt -s nullglob
wheels=("$STAGE"/wheel/*.whl)
sdists=("$STAGE"/sdist/*.tar.gz)
[ "${#wheels[@]}" -eq 1 ] || die "expected one wheel, maturin wrote ${#wheels[@]}"
[ "${#sdists[@]}" -eq 1 ] || die "expected one sdist, maturin wrote ${#sdists[@]}"
WHEEL="${wheels[0]}"
SDIST="${sdists[0]}"
WHEEL_NAME="$(basename "$WHEEL")"

# ---------------------------------------------------------------- checks
echo "==> checking $WHEEL_NAME"
case "$WHEEL_NAME" in
    "asymlora-$VERSION-cp39-abi3-"*manylinux_2_17_*.whl) ;;
    *) die "$WHEEL_NAME: expected asymlora-$VERSION-cp39-abi3-...manylinux_2_17_<arch>.whl" ;;
esac
[ "$(basename "$SDIST")" = "asymlora-$VERSION.tar.gz" ] || die "$(basename "$SDIST"): expected asymlora-$VERSION.tar.gz"
"$VENV/bin/python" -m zipfile -e "$WHEEL" "$STAGE/unpacked"
sos=("$STAGE"/unpacked/asymlora/_native*.so)
[ "${#sos[@]}" -eq 1 ] || die "expected one asymlora/_native*.so in the wheel, found ${#sos[@]}"
grep -qx "Version: $VERSION" "$STAGE/unpacked/asymlora-$VERSION.dist-info/METADATA" ||
    die "the wheel's METADATA does not say Version: $VERSION"
if command -v objdump >/dev/null; then
    GLIBC_MAX="$(objdump -T "${sos[0]}" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V | tail -n 1)"
    [ -n "$GLIBC_MAX" ] || die "objdump -T found no GLIBC symbol versions in ${sos[0]##*/}"
    newest="$(printf '%s\n' "$GLIBC_MAX" GLIBC_2.17 | sort -V | tail -n 1)"
    [ "$newest" = GLIBC_2.17 ] || die "${sos[0]##*/} needs $GLIBC_MAX, newer than GLIBC_2.17"
    echo "glibc: newest symbol version needed $GLIBC_MAX (<= GLIBC_2.17)"
elif [ "${CI:-}" = true ]; then
    die "objdump not found (binutils): cannot check the glibc symbol versions"
else
    echo "glibc: objdump not found (binutils), symbol versions not checked" >&2
    GLIBC_MAX="unchecked"
fi
if [ -x "$VENV/bin/auditwheel" ]; then
    AUDIT="$("$VENV/bin/auditwheel" show "$WHEEL")"
    echo "$AUDIT" | sed 's/^/    /'
    # "... is consistent with the following platform tag: "manylinux_2_17_x86_64"."
    echo "$AUDIT" | tr '\n' ' ' | grep -q 'consistent with the following platform tag: *"manylinux_2_17_' ||
        die "auditwheel show does not find the wheel consistent with manylinux_2_17"
else
    echo "auditwheel: not in $VENV, not run (the objdump check above covers glibc)"
fi

if [ "$CHECK_SDIST" = 1 ]; then
    echo "==> building a wheel from the sdist from scratch (pip wheel, fresh cargo target dir)"
    mkdir "$STAGE/from-sdist"
    cp "$SDIST" "$STAGE/from-sdist/"
    (
        cd "$STAGE/from-sdist"
        unset CARGO_TARGET_DIR
        "$VENV/bin/python" -m pip wheel --quiet --no-deps --no-cache-dir -w out "./$(basename "$SDIST")"
    )
    built=("$STAGE"/from-sdist/out/asymlora-"$VERSION"-cp39-abi3-*.whl)
    [ "${#built[@]}" -eq 1 ] || die "pip wheel on the sdist did not give one asymlora-$VERSION abi3 wheel"
    echo "sdist: builds from scratch into $(basename "${built[0]}")"
fi

# ---------------------------------------------------------------- result
rm -f "$OUTDIR/$WHEEL_NAME" "$OUTDIR/$(basename "$SDIST")"
mv "$WHEEL" "$SDIST" "$OUTDIR/"
TAGS="$(sed -n 's/^Tag: //p' "$STAGE/unpacked/asymlora-$VERSION.dist-info/WHEEL" | tr '\n' ' ')"
echo "==> built into $OUTDIR:"
echo "  $WHEEL_NAME ($(du -h "$OUTDIR/$WHEEL_NAME" | cut -f1); tags: ${TAGS% }; newest glibc symbol: $GLIBC_MAX)"
echo "  $(basename "$SDIST") ($(du -h "$OUTDIR/$(basename "$SDIST")" | cut -f1))"
