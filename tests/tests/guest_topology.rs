//! vCPU topology (`--topology SOCKETS:CORES:THREADS`): what the guest kernel makes of it
//! (packages, cores, thread siblings, APIC IDs), with counts that leave gaps in the APIC IDs,
//! and across a live migration.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use podvm_tests::{kvm_available, run_guest_script, SocketVm};

/// Prints, each line starting with `$1`: nproc and the online CPUs, each CPU's package, core
/// and thread siblings from sysfs, and /proc/cpuinfo's physical id, siblings, core id, cpu
/// cores and APIC ID.
const REPORT: &str = r#"report() {
  echo "$1 NPROC $(nproc)"
  echo "$1 ONLINE $(cat /sys/devices/system/cpu/online)"
  for c in /sys/devices/system/cpu/cpu[0-9]*; do
    t=$c/topology
    echo "$1 TOPO ${c##*/cpu} $(cat $t/physical_package_id) $(cat $t/core_id) $(cat $t/thread_siblings_list)"
  done
  awk -F': *' -v tag="$1" '/^processor/{p=$2} /^physical id/{ph=$2} /^siblings/{s=$2} /^core id/{c=$2} /^cpu cores/{cc=$2} /^apicid/{print tag " CPUINFO " p " " ph " " s " " c " " cc " " $2}' /proc/cpuinfo
}
"#;

/// One CPU as the guest reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cpu {
    package: u32,
    core: u32,
    thread_siblings: String,
    /// From /proc/cpuinfo: physical id, siblings, core id, cpu cores, APIC ID.
    cpuinfo: [u32; 5],
}

/// What one `report TAG` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    nproc: u32,
    online: String,
    cpus: BTreeMap<u32, Cpu>,
}

fn report(log: &str, tag: &str) -> Report {
    let mut nproc = 0;
    let mut online = String::new();
    let mut topo = BTreeMap::new();
    let mut cpuinfo = BTreeMap::new();
    let num = |w: &str| -> u32 { w.parse().unwrap_or_else(|_| panic!("{w:?} in\n{log}")) };
    for line in log.lines() {
        let Some(rest) = line
            .trim()
            .strip_prefix(tag)
            .and_then(|r| r.strip_prefix(' '))
        else {
            continue;
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        match w.as_slice() {
            ["NPROC", n] => nproc = num(n),
            ["ONLINE", list] => online = list.to_string(),
            ["TOPO", cpu, package, core, siblings] => {
                topo.insert(num(cpu), (num(package), num(core), siblings.to_string()));
            }
            ["CPUINFO", cpu, fields @ ..] if fields.len() == 5 => {
                let f: Vec<u32> = fields.iter().map(|x| num(x)).collect();
                cpuinfo.insert(num(cpu), [f[0], f[1], f[2], f[3], f[4]]);
            }
            _ => {}
        }
    }
    let cpus = topo
        .into_iter()
        .map(|(n, (package, core, thread_siblings))| {
            let info = *cpuinfo
                .get(&n)
                .unwrap_or_else(|| panic!("cpu{n} missing from /proc/cpuinfo:\n{log}"));
            (
                n,
                Cpu {
                    package,
                    core,
                    thread_siblings,
                    cpuinfo: info,
                },
            )
        })
        .collect();
    Report {
        nproc,
        online,
        cpus,
    }
}

/// Checks `r` against `sockets` x `cores` x `threads` with `apic_ids` in CPU order: every
/// CPU online, the packages, the distinct cores of each, the thread siblings (the CPUs of
/// one core, listed as the kernel lists them), and /proc/cpuinfo's counts.
fn assert_topology(
    r: &Report,
    sockets: u32,
    cores: u32,
    threads: u32,
    apic_ids: &[u32],
    log: &str,
) {
    let n = sockets * cores * threads;
    assert_eq!(r.nproc, n, "nproc\n{log}");
    assert_eq!(r.online, format!("0-{}", n - 1), "online CPUs\n{log}");
    assert_eq!(r.cpus.len(), n as usize, "CPUs in sysfs\n{log}");
    let packages: BTreeSet<u32> = r.cpus.values().map(|c| c.package).collect();
    assert_eq!(packages, (0..sockets).collect(), "packages\n{log}");
    for package in 0..sockets {
        let in_package: Vec<(&u32, &Cpu)> = r
            .cpus
            .iter()
            .filter(|(_, c)| c.package == package)
            .collect();
        assert_eq!(
            in_package.len(),
            (cores * threads) as usize,
            "package {package}\n{log}"
        );
        let core_ids: BTreeSet<u32> = in_package.iter().map(|(_, c)| c.core).collect();
        assert_eq!(
            core_ids.len(),
            cores as usize,
            "cores of package {package}\n{log}"
        );
        for core in core_ids {
            let members: Vec<u32> = in_package
                .iter()
                .filter(|(_, c)| c.core == core)
                .map(|(&n, _)| n)
                .collect();
            assert_eq!(
                members.len(),
                threads as usize,
                "threads of core {core}\n{log}"
            );
            let list = if threads == 1 {
                members[0].to_string()
            } else if members.windows(2).all(|w| w[1] == w[0] + 1) {
                format!("{}-{}", members[0], members[members.len() - 1])
            } else {
                members
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            for m in &members {
                assert_eq!(
                    r.cpus[m].thread_siblings, list,
                    "cpu{m}'s thread siblings\n{log}"
                );
            }
        }
    }
    for (n, cpu) in &r.cpus {
        let [physical_id, siblings, core_id, cpu_cores, apic_id] = cpu.cpuinfo;
        assert_eq!(
            (physical_id, core_id),
            (cpu.package, cpu.core),
            "cpu{n} in /proc/cpuinfo and sysfs\n{log}"
        );
        assert_eq!(siblings, cores * threads, "cpu{n} siblings\n{log}");
        assert_eq!(cpu_cores, cores, "cpu{n} cpu cores\n{log}");
        assert_eq!(apic_id, apic_ids[*n as usize], "cpu{n} APIC ID\n{log}");
    }
}

#[test]
fn topology_2_sockets_2_cores_2_threads_is_what_the_guest_sees() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    let script = format!("{REPORT}report T\n");
    let out = run_guest_script(
        &script,
        &["--cpus", "8", "--topology", "2:2:2", "--memory", "512"],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    let r = report(&out.stdout, "T");
    assert_topology(&r, 2, 2, 2, &[0, 1, 2, 3, 4, 5, 6, 7], &out.stdout);
}

/// [`REPORT`], then, after a line on the console (typed once the VM has migrated), the same
/// report again and a process pinned to each CPU in turn saying where it ran.
fn migrating_script(cpus: u32) -> String {
    format!(
        "{REPORT}report A\necho READY-TO-MIGRATE\nread -r line\nreport B\n\
         for n in $(seq 0 {}); do taskset -c $n awk '{{print \"RAN \" $39}}' /proc/self/stat; done\n\
         echo CHECKED\n",
        cpus - 1
    )
}

#[test]
fn topology_with_gaps_in_the_apic_ids_survives_a_live_migration() {
    if !kvm_available() {
        return;
    }
    // 2 sockets of 3 cores: cores take 2 bits, so the APIC IDs are 0-2 and 4-6.
    let apic_ids = [0, 1, 2, 4, 5, 6];
    let args = [
        "--cpus",
        "6",
        "--topology",
        "2:3:1",
        "--memory",
        "384",
        "--migration-insecure",
    ];
    let script = migrating_script(6);
    let mut src = SocketVm::start("topo-src", &script, &args);
    let log = src.wait_log("READY-TO-MIGRATE\n");
    let before = report(&log, "A");
    assert_topology(&before, 2, 3, 1, &apic_ids, &log);
    let info = src.api_json(&["info"]);
    assert_eq!(info["topology"]["cores"], 3, "{info}");

    // A destination with the same vCPU count laid out otherwise refuses, naming the flag.
    let mut other = args.to_vec();
    other[3] = "1:6:1";
    other.extend(["--migration-timeout", "20"]);
    let (refusing, addr) = SocketVm::incoming("topo-other", &script, &other);
    src.api_json(&["migrate", &addr]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        let s = src.api_json(&["migration"]);
        if s["state"] == "failed" {
            break s;
        }
        if Instant::now() > deadline {
            src.hang(&format!("the migration never failed: {s}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status["error"]
            .as_str()
            .unwrap_or("")
            .contains("--topology"),
        "{status}"
    );
    assert!(!refusing.wait().status.success());

    let (mut dst, addr) = SocketVm::incoming("topo-dst", &script, &args);
    let src_out = src.migrate_into(&mut dst, &addr);
    assert!(src_out.status.success(), "{src_out}");

    let typist = std::os::unix::net::UnixStream::connect(&dst.console).unwrap();
    (&typist).write_all(b"go\n").unwrap();
    let log = dst.wait_log("CHECKED\n");
    let after = report(&log, "B");
    assert_eq!(
        after, before,
        "the topology changed across the migration\n{log}"
    );
    // Every vCPU runs at the destination.
    let ran: BTreeSet<u32> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RAN ")?.parse().ok())
        .collect();
    assert_eq!(
        ran,
        (0..6).collect(),
        "CPUs that ran a pinned process\n{log}"
    );
    let out = dst.wait();
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
}
