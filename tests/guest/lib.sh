# shellcheck shell=bash
#
# Shared helpers for tests/guest/build.sh and tests/sandbox/build.sh.
#
# Sourced, never executed. Everything here works without root: Debian packages
# are fetched with `apt-get download` into a cache directory and unpacked with
# `dpkg-deb -x`; nothing is installed into the host.
#
# Globals set on sourcing:
#   PODVM_ROOT       the repository root (found from this file's location)
#   PODVM_DEB_CACHE  where .deb files and their extracted trees are cached
#                    (env PODVM_DEB_CACHE, default $PODVM_ROOT/target/debs)

PODVM_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
PODVM_DEB_CACHE=${PODVM_DEB_CACHE:-$PODVM_ROOT/target/debs}

# The Debian package whose dependency names the kernel image we use. Can be
# overridden with PODVM_GUEST_KERNEL_PKG (see podvm_resolve_kernel).
PODVM_DEFAULT_KERNEL_PKG=linux-image-cloud-amd64
PODVM_BUSYBOX_PKG=busybox-static

# ---------------------------------------------------------------------------
# Messages

# podvm_log MSG...: one line on stderr, prefixed with the calling script's tag.
podvm_log() {
    printf '%s: %s\n' "${PODVM_LOG_TAG:-podvm}" "$*" >&2
}

# podvm_die MSG...: log and exit 1.
podvm_die() {
    podvm_log "error: $*"
    exit 1
}

# podvm_require_cmds [--status N] CMD...: check that each command exists; if
# some are missing, print the apt-get line that installs them and exit with
# status N (default 1).
podvm_require_cmds() {
    local status=1
    if [[ ${1:-} == --status ]]; then
        status=$2
        shift 2
    fi
    local cmd pkg
    local -a missing=()
    for cmd in "$@"; do
        command -v -- "$cmd" >/dev/null 2>&1 && continue
        case $cmd in
            qemu-system-x86_64) pkg=qemu-system-x86 ;;
            apt-get | apt-cache) pkg=apt ;;
            dpkg-deb) pkg=dpkg ;;
            xz) pkg=xz-utils ;;
            sha256sum | realpath | timeout | mktemp) pkg=coreutils ;;
            ldd) pkg=libc-bin ;;
            readelf | objdump) pkg=binutils ;;
            *) pkg=$cmd ;;
        esac
        missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        podvm_log "error: missing tools; install them with:"
        printf '  apt-get install -y %s\n' "${missing[*]}" >&2
        exit "$status"
    fi
}

# ---------------------------------------------------------------------------
# Debian packages

# podvm_apt_field RECORD FIELD: print FIELD's value from a control record.
podvm_apt_field() {
    awk -v f="$2" 'index($0, f ": ") == 1 { print substr($0, length(f) + 3); exit }' <<<"$1"
}

# podvm_apt_record PKG[=VERSION]: print the package's control record (the
# candidate version, or the given one). Fails if apt does not know it.
podvm_apt_record() {
    local rec
    rec=$(apt-cache show --no-all-versions -- "$1" 2>/dev/null) || true
    if [[ -z $rec ]]; then
        podvm_log "error: apt-cache knows no package '$1'"
        podvm_log "(is the package list current? run 'apt-get update' as root)"
        return 1
    fi
    printf '%s\n' "$rec"
}

# podvm_resolve_kernel: decide which kernel image package to use. Sets
# KERNEL_PKG, KERNEL_VER and, for a local file, KERNEL_DEB.
#
# PODVM_GUEST_KERNEL_PKG may be
#   - a metapackage (default linux-image-cloud-amd64): its Depends on
#     linux-image-<abi>-<flavour> is followed, with the exact version it asks;
#   - an image package, optionally pinned: linux-image-6.1.0-28-cloud-amd64 or
#     linux-image-6.1.0-28-cloud-amd64=6.1.119-1;
#   - a path to a .deb file (for a version the mirror no longer carries).
podvm_resolve_kernel() {
    local spec=${PODVM_GUEST_KERNEL_PKG:-$PODVM_DEFAULT_KERNEL_PKG}
    KERNEL_DEB=
    if [[ $spec == *.deb ]]; then
        [[ -f $spec ]] || podvm_die "PODVM_GUEST_KERNEL_PKG=$spec: no such file"
        KERNEL_DEB=$(realpath -- "$spec")
        KERNEL_PKG=$(dpkg-deb -f "$KERNEL_DEB" Package)
        KERNEL_VER=$(dpkg-deb -f "$KERNEL_DEB" Version)
        return 0
    fi
    local pkg=${spec%%=*} ver='' rec deps hop
    [[ $spec == *=* ]] && ver=${spec#*=}
    # Follow at most a few metapackage hops (linux-image-amd64 has one).
    for hop in 1 2 3; do
        # An ABI-named image package with an exact version needs no lookup.
        if [[ $pkg == linux-image-[0-9]* && -n $ver ]]; then
            KERNEL_PKG=$pkg
            KERNEL_VER=$ver
            return 0
        fi
        rec=$(podvm_apt_record "$pkg${ver:+=$ver}") || exit 1
        ver=$(podvm_apt_field "$rec" Version)
        deps=$(podvm_apt_field "$rec" Depends)
        if [[ $deps =~ (linux-image-[0-9][^\ ,|\(]*)(\ \(=\ ([^\)]+)\))? ]]; then
            pkg=${BASH_REMATCH[1]}
            ver=${BASH_REMATCH[3]}
            continue
        fi
        KERNEL_PKG=$pkg
        KERNEL_VER=$ver
        return 0
    done
    podvm_die "cannot resolve a kernel image package from '$spec' (hop $hop)"
}

# podvm_resolve_version PKG: print the candidate version of PKG.
podvm_resolve_version() {
    local rec
    rec=$(podvm_apt_record "$1") || exit 1
    podvm_apt_field "$rec" Version
}

# podvm_fetch_deb PKG VERSION: make sure PKG_VERSION_*.deb is in the cache
# (downloading it if not) and print its path.
podvm_fetch_deb() {
    local pkg=$1 ver=$2 f tmp
    local enc=${ver//:/%3a} # apt-get download's file name encoding of epochs
    for f in "$PODVM_DEB_CACHE/${pkg}_${enc}_"*.deb; do
        [[ -f $f ]] && { printf '%s\n' "$f"; return 0; }
    done
    mkdir -p -- "$PODVM_DEB_CACHE"
    tmp=$(mktemp -d "$PODVM_DEB_CACHE/.download.XXXXXX")
    podvm_log "downloading $pkg=$ver"
    local -a aptopts=(-qq)
    # As root, apt would try (and fail) to drop privileges to _apt for a
    # download into a directory _apt cannot write; just stay root.
    ((EUID == 0)) && aptopts+=(-o APT::Sandbox::User=root)
    if ! (cd -- "$tmp" && apt-get "${aptopts[@]}" download -- "$pkg=$ver" >&2); then
        rm -rf -- "$tmp"
        podvm_die "apt-get download $pkg=$ver failed"
    fi
    for f in "$tmp"/*.deb; do
        [[ -f $f ]] || continue
        mv -f -- "$f" "$PODVM_DEB_CACHE/"
        rm -rf -- "$tmp"
        printf '%s\n' "$PODVM_DEB_CACHE/${f##*/}"
        return 0
    done
    rm -rf -- "$tmp"
    podvm_die "apt-get download $pkg=$ver produced no .deb"
}

# podvm_extract_deb DEB: unpack DEB once (cached) and print the directory.
podvm_extract_deb() {
    local deb=$1 name out tmp
    name=${deb##*/}
    name=${name%.deb}
    out=$PODVM_DEB_CACHE/extracted/$name
    if [[ ! -e $out/.podvm-extracted ]]; then
        mkdir -p -- "$PODVM_DEB_CACHE/extracted"
        tmp=$(mktemp -d "$PODVM_DEB_CACHE/extracted/.tmp.XXXXXX")
        podvm_log "extracting ${deb##*/}"
        dpkg-deb -x "$deb" "$tmp" || { rm -rf -- "$tmp"; podvm_die "dpkg-deb -x $deb failed"; }
        touch -- "$tmp/.podvm-extracted"
        rm -rf -- "$out"
        mv -- "$tmp" "$out"
    fi
    printf '%s\n' "$out"
}

# _podvm_apt_lists_stamp: print a short hash that changes whenever apt's
# package lists or its configuration of sources and pins do.
_podvm_apt_lists_stamp() {
    stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* /etc/apt/preferences* \
        /etc/apt/sources.list* 2>/dev/null | sha256sum | cut -c1-16
}

# podvm_resolve_packages: decide which package versions to use (apt metadata
# only, no download). Sets KERNEL_PKG KERNEL_VER KERNEL_DEB (may be empty) and
# BUSYBOX_VER. apt-cache needs about a second per query here, so the answer is
# remembered in the package cache until apt's package lists change.
podvm_resolve_packages() {
    podvm_require_cmds apt-get apt-cache dpkg-deb cpio gzip sha256sum realpath
    local spec=${PODVM_GUEST_KERNEL_PKG:-$PODVM_DEFAULT_KERNEL_PKG}
    local lists memo key value
    lists=$(_podvm_apt_lists_stamp)
    memo=$PODVM_DEB_CACHE/resolved-$(printf '%s|%s' "$spec" "$PODVM_BUSYBOX_PKG" | sha256sum | cut -c1-16)
    KERNEL_PKG='' KERNEL_VER='' KERNEL_DEB='' BUSYBOX_VER=''
    if [[ $spec != *.deb && -f $memo && $(head -n 1 -- "$memo") == "lists=$lists" ]]; then
        while IFS='=' read -r key value; do
            case $key in
                KERNEL_PKG) KERNEL_PKG=$value ;;
                KERNEL_VER) KERNEL_VER=$value ;;
                BUSYBOX_VER) BUSYBOX_VER=$value ;;
            esac
        done <"$memo"
        [[ -n $KERNEL_PKG && -n $KERNEL_VER && -n $BUSYBOX_VER ]] && return 0
    fi
    podvm_resolve_kernel
    BUSYBOX_VER=$(podvm_resolve_version "$PODVM_BUSYBOX_PKG")
    if [[ $spec != *.deb ]]; then
        mkdir -p -- "$PODVM_DEB_CACHE"
        printf 'lists=%s\nKERNEL_PKG=%s\nKERNEL_VER=%s\nBUSYBOX_VER=%s\n' \
            "$lists" "$KERNEL_PKG" "$KERNEL_VER" "$BUSYBOX_VER" >"$memo.tmp"
        mv -f -- "$memo.tmp" "$memo"
    fi
}

# podvm_fetch_packages: fetch and extract what podvm_resolve_packages chose.
# Sets KERNEL_DEB KERNEL_TREE KERNEL_MODDIR KERNEL_RELEASE VMLINUZ_SRC
# BUSYBOX_DEB BUSYBOX_TREE.
podvm_fetch_packages() {
    [[ -n $KERNEL_DEB ]] || KERNEL_DEB=$(podvm_fetch_deb "$KERNEL_PKG" "$KERNEL_VER")
    KERNEL_TREE=$(podvm_extract_deb "$KERNEL_DEB")

    # The modules live in lib/modules/<release> (usr/lib/modules on newer
    # Debian releases); the image is boot/vmlinuz-<release>.
    local d
    KERNEL_MODDIR=
    for d in "$KERNEL_TREE"/lib/modules/* "$KERNEL_TREE"/usr/lib/modules/*; do
        [[ -d $d ]] && { KERNEL_MODDIR=$d; break; }
    done
    [[ -n $KERNEL_MODDIR ]] || podvm_die "$KERNEL_PKG has no lib/modules/<release>"
    KERNEL_RELEASE=${KERNEL_MODDIR##*/}
    VMLINUZ_SRC=$KERNEL_TREE/boot/vmlinuz-$KERNEL_RELEASE
    [[ -f $VMLINUZ_SRC ]] || podvm_die "$KERNEL_PKG has no boot/vmlinuz-$KERNEL_RELEASE"

    BUSYBOX_DEB=$(podvm_fetch_deb "$PODVM_BUSYBOX_PKG" "$BUSYBOX_VER")
    BUSYBOX_TREE=$(podvm_extract_deb "$BUSYBOX_DEB")
    [[ -x $BUSYBOX_TREE/bin/busybox ]] || podvm_die "$PODVM_BUSYBOX_PKG has no bin/busybox"
}

# ---------------------------------------------------------------------------
# Staging an initramfs

# podvm_stage_base STAGE: lay out the directory skeleton and the static
# busybox with a symlink per applet (made now, on the host, so the image
# needs no `busybox --install` at boot).
podvm_stage_base() {
    local stage=$1 applet
    mkdir -p -- "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc/podvm,lib/podvm}
    chmod 1777 -- "$stage/tmp"
    chmod 0700 -- "$stage/root"
    install -m 0755 -- "$BUSYBOX_TREE/bin/busybox" "$stage/bin/busybox"
    # --list-full prints each applet's conventional path, e.g. usr/bin/awk.
    while IFS= read -r applet; do
        [[ -n $applet && $applet != bin/busybox ]] || continue
        mkdir -p -- "$stage/$(dirname -- "$applet")"
        ln -sfn /bin/busybox "$stage/$applet"
    done < <("$stage/bin/busybox" --list-full)
    [[ -L $stage/bin/sh ]] || ln -sfn busybox "$stage/bin/sh"
}

# Module bookkeeping, filled by podvm_stage_modules.
declare -a PODVM_MODS_LOADED=() PODVM_MODS_BUILTIN=() PODVM_MODS_MISSING=()
declare -A _podvm_mod_path=() _podvm_mod_builtin=() _podvm_mod_seen=()
_podvm_mod_stage='' _podvm_norm=''

# _podvm_mod_norm PATH-OR-NAME: set _podvm_norm to the module name (file
# name without .ko[.xz|.zst|.gz]; '-' and '_' are alike in module names, use
# '_'). No subshell: it runs once per module of the kernel.
_podvm_mod_norm() {
    _podvm_norm=${1##*/}
    _podvm_norm=${_podvm_norm%.xz}
    _podvm_norm=${_podvm_norm%.zst}
    _podvm_norm=${_podvm_norm%.gz}
    _podvm_norm=${_podvm_norm%.ko}
    _podvm_norm=${_podvm_norm//-/_}
}

# _podvm_mod_visit NAME WHY: depth-first: stage NAME's dependencies, then NAME
# itself, so PODVM_MODS_LOADED ends up in a valid load order.
_podvm_mod_visit() {
    local name=$1 why=$2 src dst deps dep
    [[ -z ${_podvm_mod_seen[$name]:-} ]] || return 0
    _podvm_mod_seen[$name]=1
    if [[ -n ${_podvm_mod_builtin[$name]:-} ]]; then
        PODVM_MODS_BUILTIN+=("$name")
        return 0
    fi
    src=${_podvm_mod_path[$name]:-}
    if [[ -z $src ]]; then
        PODVM_MODS_MISSING+=("$name")
        # A module asked for by name may just not exist in this kernel; a
        # missing dependency of an existing module is worth a warning.
        [[ $why == requested ]] || podvm_log "warning: module $name (needed by $why) not found"
        return 0
    fi
    dst=$_podvm_mod_stage/$name.ko
    # busybox insmod wants plain ELF: decompress here, at build time.
    case $src in
        *.ko.xz) podvm_require_cmds xz && xz -dc -- "$src" >"$dst" ;;
        *.ko.zst) podvm_require_cmds zstd && zstd -qdc -- "$src" >"$dst" ;;
        *.ko.gz) gzip -dc -- "$src" >"$dst" ;;
        *) cp -- "$src" "$dst" ;;
    esac
    # The module's own .modinfo section names its direct dependencies
    # ("depends=a,b"); the package ships no modules.dep (depmod makes it on
    # installation), so read them from there.
    deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n 1)
    local -a deplist=()
    IFS=, read -r -a deplist <<<"$deps"
    for dep in "${deplist[@]}"; do
        [[ -n $dep ]] || continue
        _podvm_mod_norm "$dep"
        _podvm_mod_visit "$_podvm_norm" "$name"
    done
    PODVM_MODS_LOADED+=("$name")
}

# podvm_stage_modules STAGE MODULE...: copy each MODULE (and what it depends
# on) from the kernel tree to STAGE/lib/modules/<name>.ko, decompressed, and
# write the load order to STAGE/etc/podvm/modules. Built-in modules and ones
# this kernel does not have are skipped (recorded in PODVM_MODS_BUILTIN and
# PODVM_MODS_MISSING).
podvm_stage_modules() {
    local stage=$1 f m
    shift
    PODVM_MODS_LOADED=() PODVM_MODS_BUILTIN=() PODVM_MODS_MISSING=()
    _podvm_mod_path=() _podvm_mod_builtin=() _podvm_mod_seen=()
    _podvm_mod_stage=$stage/lib/modules
    mkdir -p -- "$_podvm_mod_stage" "$stage/etc/podvm"
    while IFS= read -r -d '' f; do
        _podvm_mod_norm "$f"
        _podvm_mod_path[$_podvm_norm]=$f
    done < <(find "$KERNEL_MODDIR" -type f \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
    if [[ -f $KERNEL_MODDIR/modules.builtin ]]; then
        while IFS= read -r f; do
            [[ -n $f ]] || continue
            _podvm_mod_norm "$f"
            _podvm_mod_builtin[$_podvm_norm]=1
        done <"$KERNEL_MODDIR/modules.builtin"
    fi
    for m in "$@"; do
        _podvm_mod_norm "$m"
        _podvm_mod_visit "$_podvm_norm" requested
    done
    {
        echo "# Load order (insmod), made by tests/guest/lib.sh for $KERNEL_RELEASE"
        printf '%s\n' "${PODVM_MODS_LOADED[@]}"
    } >"$stage/etc/podvm/modules"
}

# ---------------------------------------------------------------------------
# Dynamically linked programs from Debian packages
#
# A program is named PACKAGE:PATH, PATH being where the package has it
# (socat:usr/bin/socat). Its shared libraries and the dynamic loader come from
# Debian packages too, never from the host:
#
#   podvm_resolve_programs SPEC...  which packages: the programs' packages, and
#       the ones their ELF dependencies are found in (see _podvm_walk);
#       remembered in the package cache until apt's package lists change.
#   podvm_fetch_programs            fetch and unpack those (cached).
#   podvm_stage_program STAGE PATH...  copy programs out of the unpacked trees
#       into STAGE, with every library they need, recursively.
#
# Libraries are staged where the package puts them, which is in the loader's
# built-in search path (PODVM_LIB_DIRS), and the loader at the path each
# program's PT_INTERP names (/lib64/ld-linux-x86-64.so.2, a symlink into
# /lib/x86_64-linux-gnu as in libc6); symlinks are kept as symlinks. The image
# needs no /etc/ld.so.conf and no ld.so.cache.

# The loader's built-in search path on Debian amd64 (`ld.so --help` lists it);
# without /etc/ld.so.cache it is all the loader looks in (besides RUNPATH,
# which Debian's packages do not use; a RUNPATH is reported and ignored).
PODVM_LIB_DIRS=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib usr/lib)

# Set by podvm_resolve_programs: the SPECs, and "package=version" of every
# package needed, in the order they were found (the programs' own first).
declare -a PODVM_PROGRAMS=() PODVM_PROG_PKGS=()
# Set by podvm_fetch_programs: package -> its .deb and its unpacked tree; the
# trees in search order (a library is taken from the first that has it).
declare -A PODVM_PKG_DEB=() PODVM_PKG_TREE=()
declare -a PODVM_LIB_TREES=()
# Set by podvm_stage_program: what it put into the stage (paths without the
# leading /), programs, libraries, loader and symlinks alike.
declare -a PODVM_PROG_STAGED=()

declare -A _podvm_cand=() _podvm_tree_pkg=() _podvm_walk_seen=()
_podvm_walk_fetch=0 _podvm_hit_tree='' _podvm_hit_rel=''

# _podvm_apt_candidates PKG...: look up the candidate versions of the PKGs not
# looked up yet, in one apt-cache call (about a second each), into
# _podvm_cand[PKG] ('' for a package apt has no record of, e.g. a virtual one).
_podvm_apt_candidates() {
    local p pkg='' line
    local -a ask=()
    for p in "$@"; do
        [[ -n ${_podvm_cand["$p"]+set} ]] || ask+=("$p")
    done
    ((${#ask[@]})) || return 0
    for p in "${ask[@]}"; do
        _podvm_cand["$p"]=''
    done
    while IFS= read -r line; do
        case $line in
            'Package: '*) pkg=${line#Package: } ;;
            'Version: '*)
                if [[ -n $pkg && -n ${_podvm_cand["$pkg"]+set} && -z ${_podvm_cand["$pkg"]} ]]; then
                    _podvm_cand["$pkg"]=${line#Version: }
                fi
                ;;
        esac
    done < <(apt-cache show --no-all-versions -- "${ask[@]}" 2>/dev/null)
}

# _podvm_pkg_add PKG VERSION: fetch and unpack PKG (cached), add its tree to
# the end of the search order.
_podvm_pkg_add() {
    local pkg=$1 ver=$2 deb tree
    [[ -z ${PODVM_PKG_TREE["$pkg"]:-} ]] || return 0
    deb=$(podvm_fetch_deb "$pkg" "$ver") || exit 1
    tree=$(podvm_extract_deb "$deb") || exit 1
    PODVM_PKG_DEB["$pkg"]=$deb
    PODVM_PKG_TREE["$pkg"]=$tree
    _podvm_tree_pkg["$tree"]=$pkg
    PODVM_LIB_TREES+=("$tree")
}

# _podvm_locate NEED: find NEED, a soname (libc.so.6: in PODVM_LIB_DIRS, in
# that order, as the loader looks) or an absolute path (the loader; also tried
# under /usr, for packages that assume a merged /usr), in the trees. Sets
# _podvm_hit_tree and _podvm_hit_rel (the path inside the tree); false if none
# has it.
_podvm_locate() {
    local need=$1 t d rel
    local -a rels=()
    if [[ $need == /* ]]; then
        rels=("${need#/}" "usr/${need#/}")
    else
        for d in "${PODVM_LIB_DIRS[@]}"; do
            rels+=("$d/$need")
        done
    fi
    for rel in "${rels[@]}"; do
        for t in "${PODVM_LIB_TREES[@]}"; do
            if [[ -e $t/$rel || -L $t/$rel ]]; then
                _podvm_hit_tree=$t _podvm_hit_rel=$rel
                return 0
            fi
        done
    done
    return 1
}

# _podvm_fetch_provider NEED OWNER: NEED is in none of the trees; fetch the
# packages OWNER depends on (Pre-Depends and Depends, every alternative; not
# the ones fetched already) until one has it: first the one named like the
# library (libfoo.so.1 in libfoo1 or libfoo-1, '_' as '-'), then the other
# lib* ones, then the rest. False if none has it.
_podvm_fetch_provider() {
    local need=$1 owner=$2 p key ver
    local -a deps=() named=() libs=() others=()
    mapfile -t deps < <(dpkg-deb -f "${PODVM_PKG_DEB[$owner]}" Pre-Depends Depends |
        sed 's/^[A-Za-z-]*://; s/[,|]/\n/g' |
        sed 's/([^)]*)//g; s/:[a-z0-9]*//; s/[[:space:]]//g' | awk 'NF && !seen[$0]++')
    key=${need##*/}
    ver=${key##*.so.}
    key=${key%%.so*}
    key=${key,,}
    key=${key//_/-}
    for p in "${deps[@]}"; do
        [[ -z ${PODVM_PKG_TREE["$p"]:-} ]] || continue
        if [[ $key == lib* && ($p == "$key$ver" || $p == "$key-$ver" || $p == "$key") ]]; then
            named+=("$p")
        elif [[ $p == lib* ]]; then
            libs+=("$p")
        else
            others+=("$p")
        fi
    done
    for p in "${named[@]}" "${libs[@]}" "${others[@]}"; do
        _podvm_apt_candidates "${named[@]}" "${libs[@]}" "${others[@]}"
        [[ -n ${_podvm_cand["$p"]} ]] || continue # virtual, or unknown
        _podvm_pkg_add "$p" "${_podvm_cand["$p"]}"
        PODVM_PROG_PKGS+=("$p=${_podvm_cand["$p"]}")
        _podvm_locate "$need" && return 0
    done
    return 1
}

# _podvm_follow TREE REL: print "link<TAB>REL<TAB>TARGET" for each symlink on
# the way from REL (in TREE) to a regular file, then "file<TAB>TREE<TAB>REL"
# for that file. A link's target may be in another package's tree.
_podvm_follow() {
    local tree=$1 rel=$2 target hops=0
    while [[ -L $tree/$rel ]]; do
        ((++hops <= 16)) || podvm_die "/$2: too many levels of symlinks"
        target=$(readlink -- "$tree/$rel")
        printf 'link\t%s\t%s\n' "$rel" "$target"
        if [[ $target == /* ]]; then
            rel=${target#/}
        else
            rel=$(realpath -ms -- "/$(dirname -- "$rel")/$target")
            rel=${rel#/}
        fi
        [[ -e $tree/$rel || -L $tree/$rel ]] && continue
        _podvm_locate "/$rel" || podvm_die "/$rel (a symlink's target) is in none of the packages"
        tree=$_podvm_hit_tree
    done
    [[ -f $tree/$rel ]] || podvm_die "/$rel: not a regular file in ${tree##*/}"
    printf 'file\t%s\t%s\n' "$tree" "$rel"
}

# _podvm_walk STAGE TREE REL: visit TREE/REL (following symlinks) and,
# depth-first, everything it needs: its PT_INTERP and its NEEDED sonames
# (readelf). With a STAGE, copy each into it at the same path (symlinks as
# symlinks). A need no tree has is looked for in the packages the needing
# package depends on when _podvm_walk_fetch=1, and is an error otherwise.
_podvm_walk() {
    local stage=$1 tree=$2 rel=$3 out kind a b ftree='' frel='' dyn need owner
    local -a needs=()
    out=$(_podvm_follow "$tree" "$rel") || exit 1
    while IFS=$'\t' read -r kind a b; do
        if [[ $kind == link ]]; then
            if [[ -n $stage && -z ${_podvm_walk_seen["link:$a"]:-} ]]; then
                _podvm_walk_seen["link:$a"]=1
                mkdir -p -- "$stage/$(dirname -- "$a")"
                rm -rf -- "${stage:?}/$a"
                ln -s -- "$b" "$stage/$a"
                PODVM_PROG_STAGED+=("$a")
            fi
        else
            ftree=$a frel=$b
        fi
    done <<<"$out"
    [[ -z ${_podvm_walk_seen["file:$frel"]:-} ]] || return 0
    _podvm_walk_seen["file:$frel"]=1
    if [[ -n $stage ]]; then
        mkdir -p -- "$stage/$(dirname -- "$frel")"
        # Never write through whatever is there (a busybox applet symlink
        # points at /bin/busybox, which is the host's outside the stage).
        rm -rf -- "${stage:?}/$frel"
        cp --preserve=mode -- "$ftree/$frel" "$stage/$frel"
        PODVM_PROG_STAGED+=("$frel")
    fi
    owner=${_podvm_tree_pkg[$ftree]}
    dyn=$(LC_ALL=C readelf -d -l -W -- "$ftree/$frel" 2>&1) ||
        podvm_die "/$frel (from $owner) is not an ELF file: $dyn"
    if grep -qE '\((RPATH|RUNPATH)\)' <<<"$dyn"; then
        podvm_log "warning: /$frel (from $owner) has an RPATH/RUNPATH; ignored," \
            "its libraries are looked for in the system directories only"
    fi
    mapfile -t needs < <(sed -n \
        -e 's/.*\[Requesting program interpreter: \(.*\)\]$/\1/p' \
        -e 's/.*(NEEDED).*Shared library: \[\(.*\)\]$/\1/p' <<<"$dyn")
    for need in "${needs[@]}"; do
        if ! _podvm_locate "$need"; then
            if ! ((_podvm_walk_fetch)) || ! _podvm_fetch_provider "$need" "$owner"; then
                podvm_die "$need, needed by /$frel (from $owner), is in none of the packages" \
                    "${PODVM_PROG_PKGS[*]%%=*} nor in those $owner depends on"
            fi
        fi
        if [[ $need == /* && $_podvm_hit_rel != "${need#/}" ]]; then
            # Found under /usr only (merged-/usr packages): the path
            # asked for becomes a symlink there.
            if [[ -n $stage && -z ${_podvm_walk_seen["link:${need#/}"]:-} ]]; then
                _podvm_walk_seen["link:${need#/}"]=1
                mkdir -p -- "$stage/$(dirname -- "${need#/}")"
                rm -rf -- "${stage:?}/${need#/}"
                ln -s -- "/$_podvm_hit_rel" "$stage/${need#/}"
                PODVM_PROG_STAGED+=("${need#/}")
            fi
        fi
        _podvm_walk "$stage" "$_podvm_hit_tree" "$_podvm_hit_rel"
    done
}

# podvm_resolve_programs SPEC...: decide which packages the programs SPEC
# (PACKAGE:PATH) need: their own packages (the candidate version) and, from
# the programs' ELF dependencies, recursively, the library packages (each
# found among the Depends of the package that needs it, candidate version).
# This downloads and unpacks packages (into the cache; the build needs them
# anyway). Sets PODVM_PROGRAMS and PODVM_PROG_PKGS; the answer is remembered
# in the package cache until apt's package lists change.
podvm_resolve_programs() {
    podvm_require_cmds apt-get apt-cache dpkg-deb readelf realpath sha256sum
    local lists memo spec pkg path
    PODVM_PROGRAMS=("$@") PODVM_PROG_PKGS=()
    lists=$(_podvm_apt_lists_stamp)
    memo=$PODVM_DEB_CACHE/programs-$(printf 'v1 %s\n' "$@" | sha256sum | cut -c1-16)
    if [[ -f $memo && $(head -n 1 -- "$memo") == "lists=$lists" ]]; then
        mapfile -t PODVM_PROG_PKGS < <(tail -n +2 -- "$memo")
        ((${#PODVM_PROG_PKGS[@]})) && return 0
    fi
    podvm_log "resolving the packages of ${*%%:*} and of their libraries"
    PODVM_PKG_DEB=() PODVM_PKG_TREE=() PODVM_LIB_TREES=() _podvm_tree_pkg=() _podvm_walk_seen=()
    for spec in "$@"; do
        pkg=${spec%%:*}
        path=${spec#*:}
        [[ $pkg != "$spec" && -n $pkg && -n $path ]] || podvm_die "program '$spec' is not PACKAGE:PATH"
        if [[ -z ${PODVM_PKG_TREE["$pkg"]:-} ]]; then
            _podvm_apt_candidates "$pkg"
            if [[ -z ${_podvm_cand["$pkg"]} ]]; then
                podvm_log "error: apt-cache knows no package '$pkg'"
                podvm_die "(is the package list current? run 'apt-get update' as root)"
            fi
            _podvm_pkg_add "$pkg" "${_podvm_cand["$pkg"]}"
            PODVM_PROG_PKGS+=("$pkg=${_podvm_cand["$pkg"]}")
        fi
        [[ -e ${PODVM_PKG_TREE["$pkg"]}/$path ]] || podvm_die "package $pkg has no /$path"
        _podvm_walk_fetch=1
        _podvm_walk '' "${PODVM_PKG_TREE["$pkg"]}" "$path"
        _podvm_walk_fetch=0
    done
    mkdir -p -- "$PODVM_DEB_CACHE"
    printf 'lists=%s\n' "$lists" >"$memo.tmp"
    printf '%s\n' "${PODVM_PROG_PKGS[@]}" >>"$memo.tmp"
    mv -f -- "$memo.tmp" "$memo"
}

# podvm_fetch_programs: fetch and unpack the packages podvm_resolve_programs
# chose (cached). Sets PODVM_PKG_DEB, PODVM_PKG_TREE and PODVM_LIB_TREES.
podvm_fetch_programs() {
    local pv
    for pv in "${PODVM_PROG_PKGS[@]}"; do
        _podvm_pkg_add "${pv%%=*}" "${pv#*=}"
    done
}

# podvm_programs_debs_sha256: one sha256 over the sha256 of each program
# package's .deb, in PODVM_PROG_PKGS order (after podvm_fetch_programs).
podvm_programs_debs_sha256() {
    local pv
    for pv in "${PODVM_PROG_PKGS[@]}"; do
        printf '%s %s\n' "$pv" "$(podvm_sha256 "${PODVM_PKG_DEB[${pv%%=*}]}")"
    done | sha256sum | cut -d' ' -f1
}

# podvm_stage_program STAGE PATH...: copy each PATH (a program, or a library,
# inside one of the unpacked trees, e.g. ${PODVM_PKG_TREE[socat]}/usr/bin/socat)
# into STAGE at its path in the package, with its loader and every library it
# needs, recursively (readelf -d NEEDED, -l PT_INTERP), each found in the trees
# (PODVM_LIB_TREES, in PODVM_LIB_DIRS) and put at the same path in STAGE.
# Anything not found is an error. Appends what it staged to PODVM_PROG_STAGED.
podvm_stage_program() {
    local stage=$1 path t tree
    shift
    podvm_require_cmds readelf realpath
    ((${#PODVM_LIB_TREES[@]})) || podvm_die "podvm_stage_program: no package trees (podvm_fetch_programs)"
    _podvm_walk_seen=()
    _podvm_walk_fetch=0
    for path in "$@"; do
        tree=
        for t in "${PODVM_LIB_TREES[@]}"; do
            [[ $path == "$t"/* ]] && { tree=$t; break; }
        done
        [[ -n $tree ]] || podvm_die "podvm_stage_program: $path is in none of the unpacked packages"
        _podvm_walk "$stage" "$tree" "${path#"$tree"/}"
    done
}

# podvm_mkcpio STAGE OUT: pack STAGE into a gzip'd newc cpio archive OUT,
# reproducibly (sorted names, fixed mtimes and owners, no gzip timestamp).
podvm_mkcpio() {
    local stage=$1 out=$2
    find "$stage" -exec touch -h -d @0 -- {} +
    (
        cd -- "$stage" || exit
        find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
            cpio --null --create --format=newc --owner=0:0 --reproducible --quiet
    ) | gzip -n -9 >"$out.tmp"
    mv -f -- "$out.tmp" "$out"
}

# podvm_sha256 FILE: print FILE's sha256.
podvm_sha256() {
    local sum
    sum=$(sha256sum -- "$1")
    printf '%s\n' "${sum%% *}"
}

# podvm_inputs_hash WORD...: sha256 over the given words and files: a word
# naming an existing file contributes the file's content, others themselves.
podvm_inputs_hash() {
    local w
    for w in "$@"; do
        if [[ -f $w ]]; then
            printf 'file %s\n' "${w##*/}"
            cat -- "$w"
        else
            printf 'word %s\n' "$w"
        fi
    done | sha256sum | cut -d' ' -f1
}

# podvm_versions_get FILE KEY: print KEY's value from a VERSIONS file.
podvm_versions_get() {
    [[ -f $1 ]] || return 0
    sed -n "s/^$2=//p" -- "$1" | head -n 1
}

# podvm_outputs_current VERSIONS INPUTS_HASH KEY=FILE...: true if VERSIONS
# records INPUTS_HASH and each FILE exists with the sha256 recorded under KEY.
podvm_outputs_current() {
    local versions=$1 inputs=$2 kv
    shift 2
    [[ -f $versions && $(podvm_versions_get "$versions" inputs_sha256) == "$inputs" ]] || return 1
    for kv in "$@"; do
        [[ -f ${kv#*=} ]] || return 1
        [[ $(podvm_versions_get "$versions" "${kv%%=*}") == "$(podvm_sha256 "${kv#*=}")" ]] || return 1
    done
}

# podvm_write_versions OUTDIR WRITER INPUTS KEY=FILE...: writes OUTDIR/VERSIONS, the record
# of what was built (package versions, module lists, the inputs hash, and the sha256 of each
# output FILE under KEY), atomically. WRITER names the script in the header line.
podvm_write_versions() {
    local outdir=$1 writer=$2 inputs=$3 pair
    shift 3
    {
        echo "# Written by $writer; see $(dirname -- "$writer")/README.md. Do not edit."
        echo "kernel_package=$KERNEL_PKG"
        echo "kernel_version=$KERNEL_VER"
        echo "kernel_release=$KERNEL_RELEASE"
        echo "kernel_deb_sha256=$(podvm_sha256 "$KERNEL_DEB")"
        echo "busybox_package=$PODVM_BUSYBOX_PKG"
        echo "busybox_version=$BUSYBOX_VER"
        echo "busybox_deb_sha256=$(podvm_sha256 "$BUSYBOX_DEB")"
        echo "modules_loaded=${PODVM_MODS_LOADED[*]}"
        echo "modules_builtin=${PODVM_MODS_BUILTIN[*]}"
        echo "modules_absent=${PODVM_MODS_MISSING[*]}"
        if ((${#PODVM_PROG_PKGS[@]})); then
            echo "programs=${PODVM_PROGRAMS[*]}"
            echo "program_packages=${PODVM_PROG_PKGS[*]}"
            echo "program_debs_sha256=$(podvm_programs_debs_sha256)"
            echo "program_files=${PODVM_PROG_STAGED[*]}"
        fi
        echo "inputs_sha256=$inputs"
        for pair in "$@"; do
            echo "${pair%%=*}=$(podvm_sha256 "${pair#*=}")"
        done
    } >"$outdir/VERSIONS.tmp"
    mv -f -- "$outdir/VERSIONS.tmp" "$outdir/VERSIONS"

    podvm_log "built $outdir: $KERNEL_PKG $KERNEL_VER, modules: ${PODVM_MODS_LOADED[*]}"
    ((${#PODVM_MODS_BUILTIN[@]} == 0)) || podvm_log "built into the kernel: ${PODVM_MODS_BUILTIN[*]}"
    ((${#PODVM_PROG_PKGS[@]} == 0)) || podvm_log "programs: ${PODVM_PROGRAMS[*]#*:}" \
        "(${#PODVM_PROG_STAGED[@]} files from ${PODVM_PROG_PKGS[*]})"
    ((${#PODVM_MODS_MISSING[@]} == 0)) || podvm_log "not in this kernel: ${PODVM_MODS_MISSING[*]}"
}
