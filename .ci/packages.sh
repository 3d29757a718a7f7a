#!/usr/bin/env bash
# Best effort: Debian packages that some tests need (they skip, saying why, when a package is absent):
#   fluidsynth + fluid-soundfont-gm  render VGMIDI's MIDI files to audio (tests/test_vgmidi.py)
#   chromium + chromium-driver       drive the rating page in a real headless browser (tests/test_rate_browser.py)
# Installs only what is missing; exits non-zero if anything could not be installed (.ci/run warns).
set -uo pipefail
say() { echo "packages.sh: $*" >&2; }
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else say "not root and no sudo"; exit 1; fi
fi
missing=()
for pkg in fluidsynth fluid-soundfont-gm chromium chromium-driver; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
say "installing ${missing[*]} (apt-get)"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
status=0
for pkg in "${missing[@]}"; do
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2 \
        || { say "could not install $pkg"; status=1; }
done
exit $status
