#!/usr/bin/env bash
# Builds the Debian package: target/debian/tandem_<version>-1_<arch>.deb.
# Installs cargo-deb first if it is missing (from crates.io, into ~/.cargo).
#
#     packaging/build-deb.sh [extra cargo-deb arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
CARGO_DEB_VERSION="${CARGO_DEB_VERSION:-3.8.0}"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "== installing cargo-deb $CARGO_DEB_VERSION (once)"
    cargo install --locked --version "$CARGO_DEB_VERSION" cargo-deb
fi
cargo deb --locked "$@"
ls -1 target/debian/*.deb
