//! How the tests run podvm: as a VM pod runs it. When the tests run as root (CI does),
//! every podvm that boots a guest starts as uid and gid 107 (KubeVirt's qemu user) with no
//! supplementary group, no capability (none permitted, effective, inheritable, ambient or
//! in the bounding set), `no_new_privs`, and under the pod's `Localhost` seccomp profile
//! `resources/seccomp/podvm.json` applied before exec, as a container runtime applies it;
//! podvm's own per-thread filters (kill mode) stack on top. What the tests hand podvm
//! (directories, disk images, loop devices, sockets) they give to uid 107 first, as kubelet
//! and the container runtime do for a pod (fsGroup, device ownership).
//!
//! `PODVM_TEST_AS_ROOT=1` runs podvm as the tests' own user instead (debugging). Where the
//! tests are not root, podvm runs as they do.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde_json::Value;

/// The VM pod's user and group.
pub const UID: u32 = 107;
pub const GID: u32 = 107;

/// Whether podvm runs as a pod's user (see the module's documentation).
pub fn unprivileged() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let asked_root = std::env::var_os("PODVM_TEST_AS_ROOT").is_some_and(|v| v == "1");
        // podvm under strace (see `vm_command`): the profile forbids ptrace.
        let traced = std::env::var_os("PODVM_TEST_STRACE").is_some();
        root && !asked_root && !traced
    })
}

/// The uid podvm runs as in the tests.
pub fn podvm_uid() -> u32 {
    if unprivileged() {
        UID
    } else {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }
}

/// Gives `path` to the pod's user, as kubelet does with a pod's volumes.
pub fn give(path: impl AsRef<Path>) {
    if unprivileged() {
        let path = path.as_ref();
        std::os::unix::fs::chown(path, Some(UID), Some(GID))
            .unwrap_or_else(|e| panic!("chown {} to {UID}: {e}", path.display()));
    }
}

/// The pod's seccomp profile, as shipped (compiled into the tests: the KVM sandbox has
/// no checkout), compiled once.
const PROFILE: &str = include_str!("../../resources/seccomp/podvm.json");

fn profile_program() -> &'static BpfProgram {
    static PROGRAM: OnceLock<BpfProgram> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let profile: Value = serde_json::from_str(PROFILE)
            .unwrap_or_else(|e| panic!("resources/seccomp/podvm.json: {e}"));
        oci_program(&profile).unwrap_or_else(|e| panic!("resources/seccomp/podvm.json: {e}"))
    })
}

/// Makes `cmd` (a podvm about to be spawned) start as the pod's user under the pod's
/// profile. Call it last, after anything else the child must do while still root.
pub fn confine(cmd: &mut Command) {
    if !unprivileged() {
        return;
    }
    let program = profile_program().clone();
    // The closure runs in the child between fork and exec and makes only raw system calls
    // (prctl, setgroups, setresgid, setresuid, seccomp); the program was built before.
    // SAFETY: those calls are async-signal-safe and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_long| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            for cap in 0..64 {
                let rc = libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::syscall(
                libc::SYS_setgroups,
                0,
                std::ptr::null::<libc::gid_t>(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, GID, GID, GID))?;
            // Leaving uid 0 empties the permitted, effective and ambient sets.
            check(libc::syscall(libc::SYS_setresuid, UID, UID, UID))?;
            // Sets no_new_privs first, as a container runtime does with a profile.
            seccompiler::apply_filter(&program)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(())
        });
    }
}

/// Compiles an OCI seccomp profile (`linux.seccomp` of a container, which is what a
/// `Localhost` profile becomes): `defaultAction` SCMP_ACT_ERRNO (with `defaultErrnoRet`,
/// EPERM when absent) or SCMP_ACT_KILL*, rules with action SCMP_ACT_ALLOW whose `args` are
/// compared with SCMP_CMP_EQ or SCMP_CMP_MASKED_EQ (all of a rule's args must hold), for
/// x86_64. Anything else is refused, naming the field.
pub fn oci_program(profile: &Value) -> Result<BpfProgram, String> {
    let default = match profile["defaultAction"].as_str() {
        Some("SCMP_ACT_ERRNO") => {
            let errno = profile["defaultErrnoRet"]
                .as_u64()
                .unwrap_or(libc::EPERM as u64);
            SeccompAction::Errno(errno as u32)
        }
        Some("SCMP_ACT_KILL") | Some("SCMP_ACT_KILL_THREAD") => SeccompAction::KillThread,
        Some("SCMP_ACT_KILL_PROCESS") => SeccompAction::KillProcess,
        other => return Err(format!("defaultAction {other:?} is not supported")),
    };
    match profile["architectures"].as_array() {
        Some(a) if a.iter().any(|x| x == "SCMP_ARCH_X86_64") => {}
        other => {
            return Err(format!(
                "architectures {other:?}: SCMP_ARCH_X86_64 is needed"
            ))
        }
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional = Vec::new();
    let list = profile["syscalls"]
        .as_array()
        .ok_or("syscalls is not a list")?;
    for (i, rule) in list.iter().enumerate() {
        if rule["action"] != "SCMP_ACT_ALLOW" {
            return Err(format!(
                "syscalls[{i}].action {}: only SCMP_ACT_ALLOW is supported",
                rule["action"]
            ));
        }
        let mut conditions = Vec::new();
        for (j, arg) in rule["args"].as_array().into_iter().flatten().enumerate() {
            let index = arg["index"]
                .as_u64()
                .filter(|&x| x <= 5)
                .ok_or(format!("syscalls[{i}].args[{j}].index"))? as u8;
            let value = arg["value"]
                .as_u64()
                .ok_or(format!("syscalls[{i}].args[{j}].value"))?;
            let (op, value) = match arg["op"].as_str() {
                Some("SCMP_CMP_EQ") => (SeccompCmpOp::Eq, value),
                Some("SCMP_CMP_MASKED_EQ") => (
                    SeccompCmpOp::MaskedEq(value),
                    arg["valueTwo"].as_u64().unwrap_or(0),
                ),
                other => {
                    return Err(format!(
                        "syscalls[{i}].args[{j}].op {other:?} is not supported"
                    ))
                }
            };
            let len = if value > u64::from(u32::MAX) {
                SeccompCmpArgLen::Qword
            } else {
                SeccompCmpArgLen::Dword
            };
            conditions
                .push(SeccompCondition::new(index, len, op, value).map_err(|e| e.to_string())?);
        }
        for name in rule["names"]
            .as_array()
            .ok_or(format!("syscalls[{i}].names"))?
        {
            let name = name.as_str().ok_or(format!("syscalls[{i}].names"))?;
            let nr = podvm_seccomp::names::SYSCALLS
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(nr, _)| *nr)
                .ok_or(format!("syscalls[{i}]: unknown call {name:?}"))?;
            if conditions.is_empty() {
                unconditional.push(nr);
            } else {
                rules
                    .entry(nr)
                    .or_default()
                    .push(SeccompRule::new(conditions.clone()).map_err(|e| e.to_string())?);
            }
        }
    }
    for nr in unconditional {
        rules.insert(nr, Vec::new());
    }
    let filter = SeccompFilter::new(rules, default, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_profile_compiles_and_odd_profiles_are_refused_by_field() {
        let text = std::fs::read_to_string(crate::repo_root().join("resources/seccomp/podvm.json"))
            .unwrap();
        assert!(oci_program(&serde_json::from_str(&text).unwrap()).is_ok());
        let bad = |v: serde_json::Value, field: &str| {
            let e = oci_program(&v).unwrap_err();
            assert!(e.contains(field), "{e}");
        };
        bad(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW"}),
            "defaultAction",
        );
        bad(
            serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"action": "SCMP_ACT_ALLOW", "names": ["no_such_call"]}]}),
            "no_such_call",
        );
        bad(
            serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"action": "SCMP_ACT_ALLOW", "names": ["ioctl"],
                    "args": [{"index": 1, "value": 1, "op": "SCMP_CMP_GT"}]}]}),
            "args[0].op",
        );
    }
}
