# Sourced by scripts/package and scripts/test-arm64: the arm64 cross toolchain and its
# environment, set here for this process only (nothing goes into ~/.cargo).
#
#   Rust          aarch64-unknown-linux-gnu standard library (rustup target add)
#   C (SQLite, ring)  Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, binutils
#   running arm64 binaries (tests, generate-docs)  qemu-user's qemu-aarch64, with the arm64
#                 libc of libc6-dev-arm64-cross's sysroot (-L /usr/aarch64-linux-gnu)
#
# The cross build has its own target directory (target/cross, or CARGO_TARGET_DIR if set): it
# is a second full build of every dependency, and with it a native build and a cross build
# can run at once instead of waiting for each other's lock.

ARM64_TRIPLE=aarch64-unknown-linux-gnu

# apt-get install what is missing (as root; otherwise say what to install).
need_debs() {
    local missing=()
    for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "$0 needs: apt-get install ${missing[*]}" >&2; exit 1
    fi
    echo "==> apt-get install ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

# Installs what is missing and exports the cross build's environment.
arm64_env() {
    need_debs gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-user
    rustup target list --installed | grep -qx "$ARM64_TRIPLE" || rustup target add "$ARM64_TRIPLE" >&2
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
    export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
    if [ -z "${CARGO_TARGET_DIR:-}" ]; then
        CARGO_TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/cross"
        export CARGO_TARGET_DIR
    fi
}
