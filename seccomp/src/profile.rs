//! The pod's seccomp profile (OCI / Kubernetes `Localhost`): what podvm needs from exec to
//! exit, that is every thread's list plus what the process does before its threads filter
//! themselves (loading, parsing the spec, opening KVM, disks, taps and sockets, building
//! the VM). Anything else fails with EPERM (`SCMP_ACT_ERRNO`).

use serde_json::{json, Value};

use crate::lists::{allowlist, Allowed, Arg};
use crate::ThreadKind;

/// Calls made before the threads filter themselves, unconditionally.
const STARTUP: &[(&str, i64)] = &[
    ("execve", libc::SYS_execve),
    ("arch_prctl", libc::SYS_arch_prctl),
    ("set_tid_address", libc::SYS_set_tid_address),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("rseq", libc::SYS_rseq),
    ("prlimit64", libc::SYS_prlimit64),
    ("getrlimit", libc::SYS_getrlimit),
    ("setrlimit", libc::SYS_setrlimit),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("poll", libc::SYS_poll),
    ("openat", libc::SYS_openat),
    // A VMI's files: looked up inside their roots, made in the run directory without
    // following symlinks (launcher::vmi::beneath).
    ("openat2", libc::SYS_openat2),
    ("open", libc::SYS_open),
    ("newfstatat", libc::SYS_newfstatat),
    ("fstat", libc::SYS_fstat),
    ("statx", libc::SYS_statx),
    ("lseek", libc::SYS_lseek),
    ("readlink", libc::SYS_readlink),
    ("readlinkat", libc::SYS_readlinkat),
    ("access", libc::SYS_access),
    ("faccessat2", libc::SYS_faccessat2),
    ("getcwd", libc::SYS_getcwd),
    ("uname", libc::SYS_uname),
    ("getuid", libc::SYS_getuid),
    ("geteuid", libc::SYS_geteuid),
    ("getgid", libc::SYS_getgid),
    ("getegid", libc::SYS_getegid),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("getdents64", libc::SYS_getdents64),
    ("memfd_create", libc::SYS_memfd_create),
    ("ftruncate", libc::SYS_ftruncate),
    // A VMI's emptyDisk, containerDisk copy and cloud-init seed are made durable.
    ("fsync", libc::SYS_fsync),
    ("fchmod", libc::SYS_fchmod),
    ("unlink", libc::SYS_unlink),
    ("unlinkat", libc::SYS_unlinkat),
    ("rename", libc::SYS_rename),
    ("renameat", libc::SYS_renameat),
    ("renameat2", libc::SYS_renameat2),
    ("mkdir", libc::SYS_mkdir),
    ("mkdirat", libc::SYS_mkdirat),
    ("bind", libc::SYS_bind),
    ("listen", libc::SYS_listen),
    // The address a destination listens on, logged (port 0 picks one).
    ("getsockname", libc::SYS_getsockname),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("eventfd2", libc::SYS_eventfd2),
    ("signalfd4", libc::SYS_signalfd4),
    ("timerfd_create", libc::SYS_timerfd_create),
    ("timerfd_settime", libc::SYS_timerfd_settime),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("seccomp", libc::SYS_seccomp),
    ("dup", libc::SYS_dup),
    ("dup2", libc::SYS_dup2),
    ("dup3", libc::SYS_dup3),
    ("pipe2", libc::SYS_pipe2),
    ("socketpair", libc::SYS_socketpair),
    ("clone3", libc::SYS_clone3),
    ("clone", libc::SYS_clone),
];

/// What the process does before filtering that the threads' lists restrict by argument:
/// loading code (mmap and mprotect with PROT_EXEC), opening unix sockets, setting up KVM,
/// taps and disks, and `prctl` for the filters themselves.
fn startup_conditional() -> Vec<Allowed> {
    let ioctls = crate::ioctls::startup();
    let mut list = vec![
        Allowed {
            name: "ioctl",
            nr: libc::SYS_ioctl,
            arg: Some(Arg::OneOf {
                index: 1,
                values: ioctls,
            }),
        },
        Allowed {
            name: "socket",
            nr: libc::SYS_socket,
            arg: Some(Arg::OneOf {
                index: 0,
                values: vec![libc::AF_UNIX as u64],
            }),
        },
        Allowed {
            name: "prctl",
            nr: libc::SYS_prctl,
            arg: Some(Arg::OneOf {
                index: 0,
                values: vec![libc::PR_SET_NO_NEW_PRIVS as u64],
            }),
        },
    ];
    for (name, nr) in [("mmap", libc::SYS_mmap), ("mprotect", libc::SYS_mprotect)] {
        list.push(Allowed {
            name,
            nr,
            arg: None,
        });
    }
    list
}

fn op_entries(allowed: &Allowed) -> Vec<Value> {
    match &allowed.arg {
        None => Vec::new(),
        Some(Arg::OneOf { index, values }) => values
            .iter()
            .map(|v| {
                json!({
                    "names": [allowed.name],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": index, "value": v, "op": "SCMP_CMP_EQ"}],
                })
            })
            .collect(),
        Some(Arg::NoBits { index, mask }) => vec![json!({
            "names": [allowed.name],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": index, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        })],
    }
}

/// The profile, as the JSON a `Localhost` seccompProfile file holds.
pub fn oci_profile() -> Value {
    let mut all: Vec<Allowed> = ThreadKind::ALL.into_iter().flat_map(allowlist).collect();
    all.extend(STARTUP.iter().map(|&(name, nr)| Allowed {
        name,
        nr,
        arg: None,
    }));
    all.extend(startup_conditional());
    let mut unconditional: Vec<&str> = all
        .iter()
        .filter(|a| a.arg.is_none())
        .map(|a| a.name)
        .collect();
    unconditional.sort_unstable();
    unconditional.dedup();
    let mut entries = vec![json!({"names": unconditional, "action": "SCMP_ACT_ALLOW"})];
    let mut seen = Vec::new();
    for a in all.iter().filter(|a| a.arg.is_some()) {
        if unconditional.contains(&a.name) {
            continue;
        }
        for entry in op_entries(a) {
            if !seen.contains(&entry) {
                seen.push(entry.clone());
                entries.push(entry);
            }
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether profile `p` lets system call `name` through with arguments `args`, read the
    /// way a container runtime applies an OCI profile: a rule allows the call when its
    /// `names` hold it and each of its `args` conditions holds (SCMP_CMP_EQ: the argument
    /// equals `value`; SCMP_CMP_MASKED_EQ: the argument masked with `value` equals
    /// `valueTwo`); without a rule, the default action (here: EPERM) applies.
    fn allows(p: &Value, name: &str, args: [u64; 6]) -> bool {
        p["syscalls"].as_array().unwrap().iter().any(|rule| {
            assert_eq!(rule["action"], "SCMP_ACT_ALLOW", "{rule}");
            let named = rule["names"].as_array().unwrap().iter().any(|n| n == name);
            named
                && rule["args"].as_array().into_iter().flatten().all(|c| {
                    let arg = args[c["index"].as_u64().unwrap() as usize];
                    let value = c["value"].as_u64().unwrap();
                    match c["op"].as_str().unwrap() {
                        "SCMP_CMP_EQ" => arg == value,
                        "SCMP_CMP_MASKED_EQ" => arg & value == c["valueTwo"].as_u64().unwrap(),
                        op => panic!("op {op} is not one the profile should use"),
                    }
                })
        })
    }

    fn with_arg(index: u8, value: u64) -> [u64; 6] {
        let mut args = [0; 6];
        args[usize::from(index)] = value;
        args
    }

    /// Every call each thread kind may make, with the arguments its list allows, passes the
    /// profile as a runtime reads it (an argument condition translated wrongly, an index or
    /// a mask, would refuse a call the thread needs); calls and argument values that no
    /// list allows are refused.
    #[test]
    fn seccomp_profile_allows_what_every_list_allows_and_refuses_the_rest() {
        let p = oci_profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["defaultErrnoRet"], libc::EPERM);
        assert_eq!(p["architectures"], json!(["SCMP_ARCH_X86_64"]));
        let mut all: Vec<Allowed> = ThreadKind::ALL.into_iter().flat_map(allowlist).collect();
        all.extend(startup_conditional());
        all.extend(STARTUP.iter().map(|&(name, nr)| Allowed {
            name,
            nr,
            arg: None,
        }));
        for a in &all {
            match &a.arg {
                None => {
                    assert!(allows(&p, a.name, [0; 6]), "{}", a.name);
                    assert!(allows(&p, a.name, [u64::MAX; 6]), "{}", a.name);
                }
                Some(Arg::OneOf { index, values }) => {
                    for &v in values {
                        assert!(allows(&p, a.name, with_arg(*index, v)), "{} {v:#x}", a.name);
                    }
                }
                Some(Arg::NoBits { index, mask }) => {
                    assert!(allows(&p, a.name, with_arg(*index, 0)), "{}", a.name);
                    assert!(allows(&p, a.name, with_arg(*index, !mask)), "{}", a.name);
                }
            }
        }
        // A conditional call with an argument no list allows is refused: an ioctl number
        // nobody uses, mmap with PROT_EXEC... unless some list allows the call outright.
        for a in all.iter().filter(|a| a.arg.is_some()) {
            if all.iter().any(|b| b.name == a.name && b.arg.is_none()) {
                continue;
            }
            let (index, refused) = match a.arg.as_ref().unwrap() {
                Arg::OneOf { index, .. } => {
                    let allowed: Vec<u64> = all
                        .iter()
                        .filter(|b| b.name == a.name)
                        .filter_map(|b| match &b.arg {
                            Some(Arg::OneOf { index: i, values }) if i == index => {
                                Some(values.clone())
                            }
                            _ => None,
                        })
                        .flatten()
                        .collect();
                    let unused = (0xdead_0000u64..).find(|v| !allowed.contains(v)).unwrap();
                    (*index, unused)
                }
                Arg::NoBits { index, mask } => (*index, *mask),
            };
            let other_rules_hold = all.iter().any(|b| {
                b.name == a.name
                    && matches!(&b.arg, Some(Arg::OneOf { index: i, .. }
                        | Arg::NoBits { index: i, .. }) if *i != index)
            });
            if !other_rules_hold {
                assert!(
                    !allows(&p, a.name, with_arg(index, refused)),
                    "{} with argument {index} = {refused:#x}",
                    a.name
                );
            }
        }
        // Calls no thread and no start-up step makes.
        for name in [
            "ptrace",
            "mount",
            "init_module",
            "kexec_load",
            "bpf",
            "unshare",
        ] {
            assert!(!all.iter().any(|a| a.name == name), "{name} is in a list");
            assert!(!allows(&p, name, [0; 6]), "{name}");
        }
        // Both ways of writing a rule are in the OCI schema's shape.
        for e in p["syscalls"].as_array().unwrap() {
            for arg in e["args"].as_array().into_iter().flatten() {
                assert!(arg["index"].as_u64().unwrap() < 6, "{e}");
                assert!(arg["value"].is_u64(), "{e}");
            }
        }
    }

    /// The profile shipped in resources/ (what the image and the manifests use, and what the
    /// guest tests apply) is the one the lists make now.
    #[test]
    fn seccomp_shipped_profile_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../resources/seccomp/podvm.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let shipped: Value = serde_json::from_str(&text).unwrap();
        assert!(
            shipped == oci_profile(),
            "{} is out of date: regenerate it with \
             `cargo run -p launcher -- seccomp-profile > resources/seccomp/podvm.json`",
            path.display()
        );
    }
}
