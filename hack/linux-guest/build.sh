#!/usr/bin/env bash
# Builds, once per machine, the small Linux guest that vmstream's tests boot:
# a kernel from Debian's linux-source-6.1 (`make tinyconfig` + kernel.config +
# patches/*.patch, output the uncompressed vmlinux ELF) and an 8 MiB ext2 root
# disk whose bytes are the same on every build. Both are cached outside the
# checkout, keyed by the Debian package version and by what this directory
# holds, so only the first run on a machine is slow (minutes):
#
#   dir=$(hack/linux-guest/build.sh)
#   $dir/vmlinux  $dir/rootfs.ext2  $dir/config  $dir/System.map
#
# where dir is ${VMSTREAM_CACHE:-~/.cache/vmstream}/linux-<debian version>-<key>
# and key is the first 12 hex digits of the sha256 over kernel.config, the
# patches and this script. Progress goes to stderr; stdout carries only the
# directory. Missing Debian packages are installed when run as root.
# docs/LINUX-GUEST.md says what the kernel is and why it is patched.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${VMSTREAM_CACHE:-$HOME/.cache/vmstream}"
source_pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz

# What the build runs: the source, Kbuild's tools (flex, bison, bc; objtool
# needs libelf), tar -J, patch, and mke2fs/debugfs for the root disk.
# hack/deps.sh probes the same packages for `make deps`.
needed=(linux-source-6.1 gcc make flex bison bc libelf-dev xz-utils patch e2fsprogs)

log() { echo "linux-guest: $*" >&2; }
die() { echo "linux-guest: $*" >&2; exit 1; }

installed() { # package
    [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == ii* ]]
}

install_missing() {
    local missing=() pkg
    for pkg in "${needed[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        die "${missing[*]} not installed and not root: run 'apt-get install ${missing[*]}' (or 'make deps') as root"
    fi
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    [[ -f "$tarball" ]] || die "$source_pkg is installed but $tarball is missing"
}

# The cache key: what this directory holds, in a fixed order.
cache_key() {
    cat "$here/kernel.config" "$here"/patches/*.patch "$here/build.sh" | sha256sum | cut -c1-12
}

# Fails, naming each, when a line of kernel.config did not survive Kconfig's
# dependency resolution: a silently dropped option would make a kernel that
# builds and then does not boot.
check_config() { # generated .config
    local generated="$1" line sym bad=()
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            grep -qxF -- "$line" "$generated" || bad+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$generated" || echo absent))")
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym="${BASH_REMATCH[1]}"
            ! grep -qE "^${sym}=" "$generated" || bad+=("$line (got: $(grep -E "^${sym}=" "$generated"))")
        fi
    done < "$here/kernel.config"
    if ((${#bad[@]})); then
        printf 'linux-guest: kernel.config asks for what the generated .config does not have (an unmet Kconfig dependency?):\n' >&2
        printf '  %s\n' "${bad[@]}" >&2
        exit 1
    fi
}

build_kernel() { # output dir
    local out="$1" work src jobs start
    start=$SECONDS
    work="$(mktemp -d "$cache/.linux-build.XXXXXX")"
    # shellcheck disable=SC2064 # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    log "unpacking $tarball into $work"
    tar -xJf "$tarball" -C "$work"
    src="$work/$source_pkg"
    [[ -d "$src" ]] || die "$tarball did not unpack to $source_pkg/"
    local p
    for p in "$here"/patches/*.patch; do
        log "applying patches/${p##*/}"
        patch -d "$src" -p1 --batch --forward --fuzz=0 --quiet < "$p" >&2 \
            || die "patches/${p##*/} does not apply to $source_pkg $version"
    done
    # No builder, host or date in the version string the guest prints.
    export KBUILD_BUILD_USER=vmstream KBUILD_BUILD_HOST=vmstream KBUILD_BUILD_VERSION=1
    export KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 1970"
    local kmake=(make -C "$src" -s ARCH=x86_64)
    { "${kmake[@]}" tinyconfig &&
        (cd "$src" && scripts/kconfig/merge_config.sh -m .config "$here/kernel.config") &&
        "${kmake[@]}" olddefconfig; } > "$work/config.log" 2>&1 \
        || die "configuring the kernel failed: $(cat "$work/config.log")"
    check_config "$src/.config"
    jobs="$(nproc)"
    log "make -j$jobs vmlinux (a few minutes)"
    "${kmake[@]}" -j"$jobs" vmlinux >&2
    objcopy --strip-debug "$src/vmlinux" "$work/vmlinux.stripped"
    if (($(stat -c %s "$work/vmlinux.stripped") < $(stat -c %s "$src/vmlinux"))); then
        mv "$work/vmlinux.stripped" "$src/vmlinux"
    fi
    cp "$src/.config" "$out/config"
    cp "$src/System.map" "$out/System.map"
    cp "$src/vmlinux" "$out/.vmlinux.tmp"
    mv "$out/.vmlinux.tmp" "$out/vmlinux"
    rm -rf "$work"
    trap - EXIT
    log "built $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes) in $((SECONDS - start)) s"
}

# The root disk. Its sha256 is the same on every build and every machine
# (fixed UUID, hash seed, times, owners and mke2fs settings): tests compare it
# before and after clones wrote, to show writes reach only each clone's overlay.
# /etc/init is executable but no program (plain text, no "#!"): the kernel's
# attempt to run it reads its first bytes off the disk and fails with -8
# (ENOEXEC), which shows that data came through virtio-blk; then the patched
# PID 1 idles.
build_rootfs() { # output dir
    local out="$1" stage conf img
    stage="$(mktemp -d "$cache/.linux-rootfs.XXXXXX")"
    # shellcheck disable=SC2064 # expand now: $stage is local
    trap "rm -rf '$stage'" EXIT
    mkdir -p "$stage/root/etc" "$stage/root/dev"
    printf 'vmstream-guest\n' > "$stage/root/etc/hostname"
    printf 'vmstream: not a program on purpose. The kernel reads this file, exec\nfails with -8 (ENOEXEC), and PID 1 idles (hack/linux-guest/patches).\n' > "$stage/root/etc/init"
    printf 'vmstream guest: a kernel-only Linux; no userspace runs here.\n' > "$stage/root/etc/motd"
    printf 'vmstream-linux-guest-rootfs-v1\n' > "$stage/root/vmstream-disk-id"
    find "$stage/root" -type d -exec chmod 0755 {} +
    find "$stage/root" -type f -exec chmod 0644 {} +
    chmod 0755 "$stage/root/etc/init"
    find "$stage/root" -exec touch -h -d @0 {} +
    # mke2fs's settings spelled out, not taken from this machine's /etc/mke2fs.conf.
    conf="$stage/mke2fs.conf"
    printf '[defaults]\n\tbase_features = sparse_super,large_file,filetype,dir_index,ext_attr\n\tblocksize = 1024\n\tinode_size = 256\n\tinode_ratio = 16384\n[fs_types]\n\text2 = {\n\t\tinode_size = 256\n\t}\n\tsmall = {\n\t\tinode_ratio = 16384\n\t}\n\tfloppy = {\n\t\tinode_ratio = 16384\n\t}\n' > "$conf"
    img="$stage/rootfs.ext2"
    : > "$img"
    local uuid=76d5e7a0-0000-4000-8000-766d73747265
    E2FSPROGS_FAKE_TIME=1 SOURCE_DATE_EPOCH=0 MKE2FS_CONFIG="$conf" \
        mke2fs -q -F -t ext2 -m 0 -L vmstream-guest -U "$uuid" \
        -E "root_owner=0:0,hash_seed=$uuid" -d "$stage/root" "$img" 8M >&2
    # mke2fs -d copies each file's owner and change time from the staging
    # tree; the change time cannot be set there, and the owner is the
    # builder's. Pin both, and the other times, on every inode.
    local path cmds=()
    for path in / /lost+found /etc /dev /etc/hostname /etc/init /etc/motd /vmstream-disk-id; do
        cmds+=("sif $path uid 0" "sif $path gid 0")
        local f
        for f in atime mtime ctime; do cmds+=("sif $path $f 0"); done
    done
    printf '%s\n' "${cmds[@]}" | E2FSPROGS_FAKE_TIME=1 debugfs -w -f - "$img" >/dev/null 2>"$stage/debugfs.err" \
        || die "debugfs could not pin times and owners in $img: $(cat "$stage/debugfs.err")"
    if grep -v '^debugfs ' "$stage/debugfs.err" | grep -q .; then
        die "debugfs: $(cat "$stage/debugfs.err")"
    fi
    mv "$img" "$out/rootfs.ext2"
    rm -rf "$stage"
    trap - EXIT
    log "built $out/rootfs.ext2 (sha256 $(sha256sum "$out/rootfs.ext2" | cut -c1-16)…)"
}

install_missing
version="$(dpkg-query -W -f='${Version}' "$source_pkg")"
dir="$cache/linux-$version-$(cache_key)"
mkdir -p "$dir"

# One build at a time per cache: tests started together wait for the first.
exec 9>"$cache/.linux-guest.lock"
flock 9

if [[ -f "$dir/vmlinux" ]]; then
    log "cached: $dir/vmlinux"
else
    build_kernel "$dir"
fi
if [[ -f "$dir/rootfs.ext2" ]]; then
    log "cached: $dir/rootfs.ext2"
else
    build_rootfs "$dir"
fi
echo "$dir"
