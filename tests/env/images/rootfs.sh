#!/usr/bin/env bash
# The base layer of the recsys images: what the binaries need from the system and nothing
# else (no shell, no package manager), as in a distroless image.
#
#   bash rootfs.sh OUT BINARY...
#
# OUT gets the shared libraries the binaries load (found with ldd, so the set follows the
# binaries: today glibc and libgcc_s), their loader, the CA bundle for TLS to S3 and
# Postgres, the time zone database, /etc/passwd and /etc/group with the user nonroot (65532),
# and an empty /tmp.
# The Dockerfile runs it in its build stage; tests/env/images.sh runs it on the host; both
# are Debian bookworm, so the layer holds the same files.
set -euo pipefail
out="${1:?usage: rootfs.sh OUT BINARY...}"
shift
(($# > 0)) || { echo "rootfs.sh: no binaries given" >&2; exit 2; }

rm -rf "$out"
mkdir -p "$out/etc/ssl/certs" "$out/tmp" "$out/home/nonroot" "$out/usr/local/bin"
chmod 1777 "$out/tmp"

# "libx.so => /lib/…/libx.so (0x…)" and the loader "/lib64/ld-linux-x86-64.so.2 (0x…)".
# With several binaries ldd also prints a "path:" header per binary: skipped.
libs="$(ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u)"
[[ -n "$libs" ]] || { echo "rootfs.sh: ldd found no libraries (static binaries need no base)" >&2; }
for lib in $libs; do
	mkdir -p "$out$(dirname "$lib")"
	cp -L "$lib" "$out$lib"
	chmod 0755 "$out$lib"
done

bundle=/etc/ssl/certs/ca-certificates.crt
[[ -s "$bundle" ]] || { echo "rootfs.sh: $bundle missing (Debian package ca-certificates)" >&2; exit 1; }
cp -L "$bundle" "$out$bundle"
chmod 0644 "$out$bundle"

# Time zones for BatchJob schedules (`spec.timeZone`), read from the image as distroless images
# carry them: Debian's tzdata without the leap-second `right/` copies.
zoneinfo=/usr/share/zoneinfo
[[ -f "$zoneinfo/Europe/Berlin" ]] || { echo "rootfs.sh: $zoneinfo missing (Debian package tzdata)" >&2; exit 1; }
mkdir -p "$out/usr/share"
cp -a "$zoneinfo" "$out/usr/share/"
rm -rf "$out$zoneinfo/right"

cat >"$out/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$out/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"
chmod 0644 "$out/etc/passwd" "$out/etc/group" "$out/etc/nsswitch.conf"
