# shellcheck shell=sh
#
# Module loading for the /init of the podvm test guest and of the KVM sandbox.
# Sourced by busybox sh inside the image (installed as /lib/podvm/modload.sh);
# plain POSIX sh.
#
# The build scripts (tests/guest/lib.sh: podvm_stage_modules) put each module,
# decompressed, at /lib/modules/<name>.ko and write /etc/podvm/modules: one
# module name per line, already in dependency order, so a plain insmod of each
# in turn works (no modules.dep and no modprobe needed).

# podvm_kmsg MSG: one line to the kernel log (so it shows on the console only
# at a verbose loglevel), or to stderr if /dev/kmsg cannot be written.
podvm_kmsg() {
    { printf '<4>podvm-init: %s\n' "$*" >/dev/kmsg; } 2>/dev/null ||
        printf 'podvm-init: %s\n' "$*" >&2
}

# podvm_load_modules LIST: insmod every module named in LIST, in order. A
# failure is logged (one line) and otherwise ignored. Options given on the
# kernel command line as <module>.<param>=<value> (e.g. kvm_amd.nested=1) are
# passed to insmod: the kernel itself applies those only to built-in code.
podvm_load_modules() {
    [ -f "$1" ] || return 0
    _pm_cmdline=$(cat /proc/cmdline 2>/dev/null) || _pm_cmdline=
    while read -r _pm_mod; do
        case $_pm_mod in '' | '#'*) continue ;; esac
        _pm_params=
        set -f # no globbing of command-line words
        for _pm_word in $_pm_cmdline; do
            case $_pm_word in *.*=*) ;; *) continue ;; esac
            _pm_prefix=${_pm_word%%.*}
            case $_pm_prefix in *-*) _pm_prefix=$(printf '%s' "$_pm_prefix" | tr - _) ;; esac
            [ "$_pm_prefix" = "$_pm_mod" ] && _pm_params="$_pm_params ${_pm_word#*.}"
        done
        # Word splitting of the parameters is intended (one per word).
        # shellcheck disable=SC2086
        if ! _pm_err=$(insmod "/lib/modules/$_pm_mod.ko" $_pm_params 2>&1); then
            podvm_kmsg "insmod $_pm_mod failed: $_pm_err"
        fi
        set +f
    done <"$1"
}
