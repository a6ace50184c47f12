# A tiny Linux guest for exercising the real kernel NBD client under QEMU (TCG; this host kernel has
# no nbd.ko and KVM does not work). Source it after scripts/lib/common.sh; do not run it.
# shellcheck shell=bash
#
#   guest_kit                                  # packages + the Debian kernel; sets GUEST_KERNEL
#   guest_initramfs OUT.cpio.gz INIT [FILE...] # busybox, nbd-client, nbd-mmap, modules, INIT as /init
#   guest_boot OUT.cpio.gz CONSOLE_LOG MEM_MB "APPEND" TIMEOUT_S
#
# Everything downloaded or derived is cached under $ROOT/.build/guest (gitignored):
#   deb/                        the linux-image .deb (downloaded once per kernel version)
#   kernel-VER/                 vmlinuz and the few modules the guest needs, taken from that .deb
#   base-VER-KEY.cpio.gz        the fixed part of the initramfs (busybox + applet links, nbd-client
#                               and its libraries, the modules); KEY hashes its inputs
# The initramfs a test boots is that base archive followed by a small second archive with /init,
# nbd-mmap and the extra files, rebuilt on every call (the kernel unpacks concatenated archives in
# order, later files win), so a changed init script or mmap tool is always picked up.
#
# The guest sees the host's loopback as 10.0.2.2 (QEMU user networking); its own address is
# 10.0.2.15/24. Inside the guest, modules are in /lib/modules/NAME.ko, loaded in the order of
# /lib/modules/order (one name a line), and nbd-mmap is /bin/nbd-mmap.

declare -F ensure_packages >/dev/null || { echo "guest.sh: source scripts/lib/common.sh first" >&2; exit 1; }

GUEST_DIR="$ROOT/.build/guest"
GUEST_PACKAGES=(qemu-system-x86 busybox-static cpio nbd-client xz-utils)
# Load order matters: each module only depends on the ones before it.
GUEST_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net nbd)

# _guest_kernel_package: the linux-image-6.1.0-NN-amd64 package the linux-image-amd64 metapackage
# currently depends on (empty if apt knows no such package).
_guest_kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# _guest_apt_update: apt-get update (as root, or via sudo).
_guest_apt_update() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "apt-get update"
    $sudo apt-get update -qq >/dev/null
}

# _guest_set_kernel PKG: sets GUEST_KVER, GUEST_TREE and GUEST_KERNEL for linux-image-VER PKG.
_guest_set_kernel() {
    GUEST_KVER=${1#linux-image-}
    GUEST_TREE="$GUEST_DIR/kernel-$GUEST_KVER"
    GUEST_KERNEL="$GUEST_TREE/boot/vmlinuz-$GUEST_KVER"
    export GUEST_KVER GUEST_TREE GUEST_KERNEL
}

# _guest_tree_ready: true when GUEST_TREE holds vmlinuz and was extracted for the current module
# list (its stamp records the list, so adding a module to GUEST_MODULES re-extracts).
_guest_tree_ready() {
    [ -f "$GUEST_KERNEL" ] && [ "$(cat "$GUEST_TREE/.extracted" 2>/dev/null)" = "${GUEST_MODULES[*]}" ]
}

# _guest_cached_deb PKG: path of the downloaded PKG .deb in the cache (empty if none).
_guest_cached_deb() {
    find "$GUEST_DIR/deb" -maxdepth 1 -name "${1}_*_amd64.deb" 2>/dev/null | sort | tail -n 1
}

# guest_kit: makes sure QEMU, busybox-static, cpio, nbd-client and xz are installed and the Debian
# kernel image is downloaded and unpacked; sets GUEST_KVER (e.g. 6.1.0-56-amd64), GUEST_TREE (the
# unpacked tree) and GUEST_KERNEL (its vmlinuz). A second call finds everything in the cache and
# downloads nothing.
guest_kit() {
    ensure_packages "${GUEST_PACKAGES[@]}"
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found after installing qemu-system-x86"

    local pkg deb
    pkg=$(_guest_kernel_package)
    if [ -z "$pkg" ]; then
        # A fresh container has empty package lists.
        _guest_apt_update || die "apt-get update failed"
        pkg=$(_guest_kernel_package)
        [ -n "$pkg" ] || die "apt-cache depends linux-image-amd64 names no linux-image-<version> package"
    fi
    _guest_set_kernel "$pkg"
    _guest_tree_ready && return 0

    mkdir -p "$GUEST_DIR/deb" || die "cannot create $GUEST_DIR/deb"
    deb=$(_guest_cached_deb "$pkg")
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        # (apt-get download writes into the current directory; as root it warns that the _apt
        # sandbox user cannot write there and downloads unsandboxed, which is fine)
        if ! (cd "$GUEST_DIR/deb" && apt-get download -q "$pkg" >/dev/null 2>&1); then
            # Stale package lists: the mirror may have dropped that version for a newer one, so
            # update, then ask again which kernel linux-image-amd64 wants.
            _guest_apt_update || die "apt-get update failed"
            pkg=$(_guest_kernel_package)
            [ -n "$pkg" ] || die "apt-cache depends linux-image-amd64 names no linux-image-<version> package"
            _guest_set_kernel "$pkg"
            _guest_tree_ready && return 0
            deb=$(_guest_cached_deb "$pkg")
            if [ -z "$deb" ]; then
                log "downloading $pkg"
                (cd "$GUEST_DIR/deb" && apt-get download -q "$pkg" >/dev/null) || die "apt-get download $pkg failed"
            fi
        fi
        deb=$(_guest_cached_deb "$pkg")
        [ -n "$deb" ] || die "apt-get download $pkg left no ${pkg}_*_amd64.deb in $GUEST_DIR/deb"
    fi

    # dpkg-deb -x would unpack all 4000 modules (~400 MB); take vmlinuz and the modules we need from
    # the package's tar (a pattern that matches nothing makes tar fail).
    local tmp="$GUEST_TREE.tmp.$$" m globs=("./boot/vmlinuz-$GUEST_KVER")
    for m in "${GUEST_MODULES[@]}"; do globs+=("./lib/modules/$GUEST_KVER/kernel/*/$m.ko*"); done
    rm -rf "$tmp" && mkdir -p "$tmp" || die "cannot create $tmp"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards "${globs[@]}" \
        || die "cannot unpack vmlinuz and the modules from $deb (truncated download? delete it and retry)"
    [ -f "$tmp/boot/vmlinuz-$GUEST_KVER" ] || die "$deb has no boot/vmlinuz-$GUEST_KVER"
    printf '%s' "${GUEST_MODULES[*]}" >"$tmp/.extracted"
    rm -rf "$GUEST_TREE" && mv "$tmp" "$GUEST_TREE" || die "cannot move $tmp to $GUEST_TREE"
    # Kernels the metapackage no longer names are of no further use.
    find "$GUEST_DIR" -mindepth 1 -maxdepth 1 -name 'kernel-*' ! -path "$GUEST_TREE" -exec rm -rf {} +
    find "$GUEST_DIR/deb" -maxdepth 1 -name '*.deb' ! -path "$deb" -delete
}

# _guest_module_file NAME: path of module NAME (.ko, .ko.xz or .ko.zst) in the unpacked tree.
_guest_module_file() {
    local f
    f=$(find "$GUEST_TREE/lib/modules/$GUEST_KVER" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" \) | head -n 1)
    [ -n "$f" ] || die "module $1 not found under $GUEST_TREE/lib/modules/$GUEST_KVER"
    printf '%s' "$f"
}

# _guest_copy_with_libs BIN DIR: copies BIN and every shared library `ldd BIN` lists (including the
# dynamic loader) to the same paths under DIR.
_guest_copy_with_libs() {
    local bin=$1 dir=$2 lib
    mkdir -p "$dir$(dirname "$bin")" && cp -L "$bin" "$dir$bin" || die "cannot copy $bin"
    # ldd lines: "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)";
    # linux-vdso has no file.
    local libs
    libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }') \
        || die "ldd $bin failed"
    for lib in $libs; do
        mkdir -p "$dir$(dirname "$lib")" && cp -L "$lib" "$dir$lib" || die "cannot copy $lib (needed by $bin)"
    done
}

# _guest_cpio DIR OUT: a gzip'd newc cpio archive of DIR's contents (owned by root).
_guest_cpio() {
    local dir=$1 out=$2
    (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$out.tmp.$$" \
        || die "cannot build cpio archive $out"
    mv "$out.tmp.$$" "$out" || die "cannot write $out"
}

# _guest_base: builds (or finds in the cache) the fixed part of the initramfs and prints its path.
_guest_base() {
    local busybox=/bin/busybox nbdc=/sbin/nbd-client m f key base
    [ -x "$busybox" ] || die "$busybox not found (package busybox-static)"
    [ -x "$nbdc" ] || die "$nbdc not found (package nbd-client)"
    # The base depends on the kernel, the module list, the busybox and nbd-client binaries, and the
    # recipe below (this file).
    key=$( { echo "$GUEST_KVER ${GUEST_MODULES[*]}"; sha256sum "$busybox" "$nbdc" "${BASH_SOURCE[0]}"; } \
        | sha256sum | cut -c1-16)
    base="$GUEST_DIR/base-$GUEST_KVER-$key.cpio.gz"
    if [ -s "$base" ]; then printf '%s' "$base"; return 0; fi

    local d
    d=$(mktemp -d "$GUEST_DIR/base.tmp.XXXXXX") || die "cannot create a temporary directory in $GUEST_DIR"
    mkdir -p "$d"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,lib/modules} || die "cannot create $d"
    chmod 1777 "$d/tmp"
    # busybox and one symlink per applet (--list-full prints paths such as usr/bin/awk).
    cp "$busybox" "$d/bin/busybox" || die "cannot copy $busybox"
    local applet
    for applet in $("$busybox" --list-full); do
        [ -e "$d/$applet" ] || ln -s /bin/busybox "$d/$applet"
    done
    # nbd-client (dynamically linked: gnutls, libnl, ...) with its libraries and loader.
    _guest_copy_with_libs "$nbdc" "$d"
    # Modules, uncompressed: busybox insmod loads plain .ko files only. (Debian 12's 6.1 kernels
    # ship them uncompressed; later Debian kernels use .ko.xz.)
    for m in "${GUEST_MODULES[@]}"; do
        f=$(_guest_module_file "$m") || exit 1
        case "$f" in
        *.ko) cp "$f" "$d/lib/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$f" >"$d/lib/modules/$m.ko" ;;
        *.ko.zst) command -v zstd >/dev/null || die "$f is zstd-compressed: install zstd"
            zstd -qdc "$f" >"$d/lib/modules/$m.ko" ;;
        esac || die "cannot copy module $f"
        echo "$m" >>"$d/lib/modules/order"
    done
    # A console for the kernel to open before /init runs (without it /init starts with no stdin,
    # stdout and stderr until it opens /dev/console itself after mounting devtmpfs). mknod needs
    # root; the test scripts' init redirects to /dev/console anyway.
    mknod -m 600 "$d/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$d/dev/null" c 1 3 2>/dev/null || true

    _guest_cpio "$d" "$base"
    rm -rf "$d"
    # Older bases (other kernel or inputs) are of no further use.
    find "$GUEST_DIR" -maxdepth 1 -name 'base-*.cpio.gz' ! -path "$base" -delete
    printf '%s' "$base"
}

# _guest_init_preamble: /lib/guest-init.sh, which every test's /init sources first: PATH, /dev
# (devtmpfs) with the console as stdin/stdout/stderr, /proc, /sys, and three helpers: `say` prints a
# "GUEST ..." line for the host to grep, `bye` reports a failure and powers off, `wait_daemon PID
# PIDFILE [LOG]` waits up to 120 s for a daemon started in the background to write its pidfile (bye,
# with LOG, if it exits first or never does).
_guest_init_preamble() {
    cat <<'PREAMBLE'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
say() { echo "GUEST $*"; }
bye() { say "FAILED: $*"; poweroff -f; sleep 60; }
wait_daemon() {
    _waits=0
    while [ ! -s "$2" ]; do
        kill -0 "$1" 2>/dev/null || bye "the daemon exited during start-up${3:+: $(cat "$3")}"
        _waits=$((_waits + 1)); [ $_waits -lt 600 ] || bye "no pidfile after 120 s${3:+: $(cat "$3")}"
        sleep 0.2
    done
}
PREAMBLE
}

# guest_initramfs OUT INIT [EXTRA...]: writes the initramfs OUT (gzip'd cpio): the cached base, plus
# INIT as /init (it should start with `. /lib/guest-init.sh`), the static nbd-mmap tool as /bin/nbd-mmap, and each EXTRA file as /bin/BASENAME.
# An EXTRA written as libs:PATH is a dynamically linked program: it goes in stripped, as
# /bin/BASENAME, with every library `ldd` lists (e.g. libs:$NBD_UMEMD; about 25 MB compressed), and
# one written as tree:DIR:DEST is the directory DIR copied to DEST (e.g. tree:$ROOT/scripts:/scripts).
# Needs guest_kit first.
guest_initramfs() {
    local out=$1 init=$2; shift 2
    [ -n "${GUEST_TREE:-}" ] || die "guest_initramfs: call guest_kit first"
    [ -f "$init" ] || die "guest_initramfs: no init script $init"
    build_mmap_tool
    local base
    base=$(_guest_base) || exit 1

    local d f
    d=$(mktemp -d "${out%/*}/initramfs.XXXXXX") || die "cannot create a temporary directory next to $out"
    mkdir -p "$d/bin" || die "cannot create $d/bin"
    install -m 755 "$init" "$d/init" || die "cannot copy $init"
    mkdir -p "$d/lib" || die "cannot create $d/lib"
    _guest_init_preamble >"$d/lib/guest-init.sh" || die "cannot write $d/lib/guest-init.sh"
    install -m 755 "$NBD_MMAP" "$d/bin/nbd-mmap" || die "cannot copy $NBD_MMAP"
    for f in "$@"; do
        case "$f" in
        libs:*)
            f=${f#libs:}
            _guest_copy_with_libs "$f" "$d"
            mv "$d$f" "$d/bin/$(basename "$f")" || die "cannot place $f"
            strip "$d/bin/$(basename "$f")" 2>/dev/null || true
            ;;
        tree:*)
            local spec=${f#tree:}
            mkdir -p "$d$(dirname "${spec#*:}")" && cp -a "${spec%%:*}" "$d${spec#*:}" || die "cannot copy $spec"
            ;;
        *) install -m 755 "$f" "$d/bin/$(basename "$f")" || die "cannot copy $f" ;;
        esac
    done
    _guest_cpio "$d" "$d.cpio.gz"
    cat "$base" "$d.cpio.gz" >"$out" || die "cannot write $out"
    rm -rf "$d" "$d.cpio.gz"
}

# guest_qemu_args INITRD CONSOLE_LOG APPEND_EXTRA: sets GUEST_QEMU_ARGS to the qemu-system-x86_64
# arguments that boot the kernel with INITRD under TCG (one vCPU, a virtio-net NIC on QEMU user
# networking, the serial console to CONSOLE_LOG), without -m: for runs that bring their own memory
# options (scripts/qemu-ram --exec).
guest_qemu_args() {
    local initrd=$1 console=$2 extra=$3
    [ -n "${GUEST_KERNEL:-}" ] || die "guest_qemu_args: call guest_kit first"
    : >"$console"
    # -nographic without a graphical window; the serial port goes to a file and the monitor nowhere,
    # so QEMU never touches the terminal (stdin is /dev/null).
    GUEST_QEMU_ARGS=(-accel tcg -cpu max -nographic -no-reboot
        -kernel "$GUEST_KERNEL" -initrd "$initrd"
        -append "console=ttyS0 quiet panic=-1 $extra"
        -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=
        -serial "file:$console" -monitor none)
}

# guest_boot INITRD CONSOLE_LOG MEM_MB APPEND_EXTRA TIMEOUT_S: boots the kernel with INITRD under
# TCG with MEM_MB of RAM (guest_qemu_args). QEMU's own messages go to CONSOLE_LOG.qemu. Returns
# QEMU's exit status: 0 when the guest powered off (its /init should end with `poweroff -f`; a panic
# also ends QEMU, because of panic=-1 and -no-reboot), 124 when it was killed after TIMEOUT_S s.
guest_boot() {
    local initrd=$1 console=$2 mem=$3 extra=$4 limit=$5
    guest_qemu_args "$initrd" "$console" "$extra"
    local rc=0
    timeout -k 5 "$limit" qemu-system-x86_64 -m "$mem" "${GUEST_QEMU_ARGS[@]}" \
        </dev/null >"$console.qemu" 2>&1 || rc=$?
    return "$rc"
}

# guest_console_text LOG OUT: the serial console LOG without carriage returns and terminal escapes
# (SeaBIOS clears the screen), for grepping.
guest_console_text() {
    tr -d '\r' <"$1" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1b[a-zA-Z]//g' >"$2"
}
