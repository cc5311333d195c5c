#!/usr/bin/env bash
# Build dist/forwarder_<version>_<arch>.deb with dpkg-deb (no debhelper needed, works offline
# once the dependency wheels are cached).
#
# Debian bookworm's python3 is 3.11 but its pydicom/pynetdicom are too old, so the Python
# dependencies are bundled privately in /usr/lib/forwarder (compiled ones make the package
# per-architecture) and /usr/bin/forwarder puts that folder first on sys.path. The exact
# versions the venv was tested with are used (pip freeze as constraints), and the installed
# dependency tree is cached in build/deb-cache/ keyed on them, so a rebuild takes seconds.
#
# Environment: PYTHON (default .venv/bin/python), OUT_DIR (default dist),
# CACHE_DIR (default build/deb-cache), DEB_COMPRESSION (default zstd; xz is smaller/slower).
set -euo pipefail

cd "$(dirname "$0")/.."
root_dir=$PWD
PYTHON=${PYTHON:-$root_dir/.venv/bin/python}
OUT_DIR=${OUT_DIR:-$root_dir/dist}
CACHE_DIR=${CACHE_DIR:-$root_dir/build/deb-cache}
DEB_COMPRESSION=${DEB_COMPRESSION:-zstd}
MAINTAINER=${DEBFULLNAME:-forwarder maintainers}" <${DEBEMAIL:-forwarder@localhost}>"

for tool in dpkg-deb dpkg; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (apt-get install dpkg-dev)" >&2; exit 1; }
done
[ -x "$PYTHON" ] || { echo "build-deb: $PYTHON not found; run make setup first" >&2; exit 1; }

version=$("$PYTHON" -c 'import sys; sys.path.insert(0, "."); import forwarder; print(forwarder.__version__)')
arch=$(dpkg --print-architecture)
pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

mkdir -p "$OUT_DIR" "$CACHE_DIR"
work=$(mktemp -d "$CACHE_DIR/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- 1. the dependency tree, cached ---------------------------------------------------------
"$PYTHON" - > "$work/requirements.txt" <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
"$PYTHON" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
    | grep -v -i '^forwarder[ =@]' > "$work/constraints.txt" || true
key=$(cat "$work/requirements.txt" "$work/constraints.txt" <(echo "$arch $pyver") \
    | sha256sum | cut -c1-16)
deps="$CACHE_DIR/deps-$key"
if [ ! -d "$deps" ]; then
    echo "build-deb: installing the Python dependencies (cached as $deps)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input \
        --only-binary=:all: --no-compile --target "$work/deps" \
        -c "$work/constraints.txt" -r "$work/requirements.txt"
    # Console scripts of the dependencies point at the build venv's python: not shipped.
    rm -rf "$work/deps/bin"
    find "$work/deps" -name __pycache__ -prune -exec rm -rf {} +
    "$PYTHON" -m compileall -q -j 0 "$work/deps" >/dev/null
    # Another build may have raced us here; either result is the same.
    mv -T "$work/deps" "$deps" 2>/dev/null || rm -rf "$work/deps"
    find "$CACHE_DIR" -maxdepth 1 -name 'deps-*' ! -name "deps-$key" -exec rm -rf {} +
fi

# --- 2. the package tree ----------------------------------------------------------------------
pkg="$work/root"
lib="$pkg/usr/lib/forwarder"
doc="$pkg/usr/share/doc/forwarder"
mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/lib" "$pkg/etc/forwarder" \
    "$pkg/lib/systemd/system" "$pkg/usr/lib/sysusers.d" "$pkg/usr/lib/tmpfiles.d" \
    "$pkg/usr/share/man/man1" "$doc/examples"
cp -al "$deps" "$lib"  # hard links: the cache is never modified in place
( cd "$root_dir" && find forwarder \( -name '*.py' -o -name py.typed -o -path 'forwarder/*/data/*' \) -print0 \
    | xargs -0 cp --parents -t "$lib" )
"$PYTHON" -m compileall -q "$lib/forwarder" >/dev/null

install -m 0755 packaging/deb/forwarder "$pkg/usr/bin/forwarder"
install -m 0644 packaging/forwarder.yaml "$pkg/etc/forwarder/forwarder.yaml"
install -m 0644 packaging/forwarder.service "$pkg/lib/systemd/system/forwarder.service"
install -m 0644 packaging/forwarder.sysusers "$pkg/usr/lib/sysusers.d/forwarder.conf"
install -m 0644 packaging/forwarder.tmpfiles "$pkg/usr/lib/tmpfiles.d/forwarder.conf"
install -m 0644 packaging/README.md "$doc/README.md"
install -m 0644 packaging/deb/copyright "$doc/copyright"
install -m 0644 packaging/grafana-dashboard.json packaging/alerts.yml "$doc/examples/"
"$PYTHON" packaging/manpage.py | gzip -9n > "$pkg/usr/share/man/man1/forwarder.1.gz"
{
    echo "forwarder ($version) unstable; urgency=medium"
    echo
    echo "  * Built from git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    echo " -- $MAINTAINER  $(date -R -u -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz" "$pkg/usr/share/man/man1/forwarder.1.gz"

for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$script" "$pkg/DEBIAN/$script"
done
echo /etc/forwarder/forwarder.yaml > "$pkg/DEBIAN/conffiles"

# The newest glibc any bundled wheel needs (manylinux_X_Y tags), for Depends: libc6.
glibc=$("$PYTHON" - "$lib" <<'PY'
import pathlib, re, sys
need = (2, 17)
for wheel in pathlib.Path(sys.argv[1]).glob("*.dist-info/WHEEL"):
    tags = re.findall(r"^Tag: .*-manylinux_(\d+)_(\d+)_", wheel.read_text(), re.M)
    if tags:
        need = max(need, min((int(a), int(b)) for a, b in tags))
print(f"{need[0]}.{need[1]}")
PY
)
# procps: /bin/kill, the unit's ExecReload= (minimal Debian systems do not have it otherwise).
installed_kb=$(du -sk --apparent-size --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<EOF
Package: forwarder
Version: $version
Architecture: $arch
Maintainer: $MAINTAINER
Installed-Size: $installed_kb
Depends: python3 (>= $pyver~), python3 (<< $pynext), python3-systemd, libc6 (>= $glibc), init-system-helpers, procps
Recommends: systemd
Suggests: dcmtk
Section: net
Priority: optional
Description: DICOM forwarding daemon (watch folder -> queue -> C-STORE)
 forwarder watches a folder, queues every complete DICOM file in a SQLite
 database and forwards it with C-STORE over pooled associations to the
 configured destinations, then moves it to done/ or failed/. Delivery is at
 least once; transient failures are retried with backoff.
 .
 Runs as the hardened systemd service forwarder.service (Type=notify with
 watchdog), logs structured fields to the journal and serves Prometheus
 metrics. The forwarder command also replaces storescu/dcmsnd, echoscu and
 storescp for manual sends, echoes and receiving.
 .
 Its Python dependencies are bundled in /usr/lib/forwarder.
EOF
( cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums )

# --- 3. the .deb ----------------------------------------------------------------------------
out="$OUT_DIR/forwarder_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$DEB_COMPRESSION" --build "$pkg" "$work/package.deb" >/dev/null
mv -f "$work/package.deb" "$out"
echo "$out"
