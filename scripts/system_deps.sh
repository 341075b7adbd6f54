#!/usr/bin/env bash
# Debian packages the tests use (fonts, tesseract, chromium). Installed only when run as root and missing.
set -u
need=()
for pkg in fonts-noto-core fonts-noto-cjk fonts-dejavu-core tesseract-ocr chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "note: missing Debian packages (${need[*]}); some tests will be skipped. Install them as root." >&2
  exit 0
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "warning: apt-get install failed; dependent tests will be skipped" >&2
