//! Booting the stock Debian cloud kernel: vCPUs, memory, the exec contract, power-off, reboot.

use podvm_tests::{kvm_available, run_guest_script};

const REPORT: &str = "echo CPUS=$(grep -c ^processor /proc/cpuinfo)\n\
                      echo MEMTOTAL_KB=$(awk '/MemTotal/ {print $2}' /proc/meminfo)\n";

fn boots_with(cpus: &str, memory_mib: u64) {
    if !kvm_available() {
        return;
    }
    let memory = memory_mib.to_string();
    let out = run_guest_script(REPORT, &["--cpus", cpus, "--memory", &memory]);
    assert!(out.status.success(), "{out}");
    assert_eq!(out.value("CPUS").as_deref(), Some(cpus), "{out}");
    let mem_kb: u64 = out
        .value("MEMTOTAL_KB")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in output\n{out}"));
    // MemTotal is RAM minus what the kernel reserves for itself (its image, page structs,
    // crash kernel...): within 25% of the size asked for, and never more.
    let asked_kb = memory_mib * 1024;
    assert!(
        mem_kb <= asked_kb,
        "MemTotal {mem_kb} kB > {asked_kb} kB\n{out}"
    );
    assert!(
        mem_kb >= asked_kb * 3 / 4,
        "MemTotal {mem_kb} kB too small\n{out}"
    );
    assert_eq!(out.script_status(), Some(0), "{out}");
}

#[test]
fn guest_boots_with_one_cpu_and_sees_its_memory() {
    boots_with("1", 256);
}

#[test]
fn guest_boots_with_two_cpus_and_sees_both() {
    boots_with("2", 384);
}

#[test]
fn guest_script_output_and_status_reach_stdout() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    let out = run_guest_script("echo hello-from-the-guest\nexit 3\n", &[]);
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("hello-from-the-guest"), "{out}");
    assert_eq!(out.script_status(), Some(3), "{out}");
}

#[test]
fn guest_script_stops_at_its_first_failing_command_and_names_the_line() {
    if !kvm_available() {
        return;
    }
    let out = run_guest_script(
        "echo before-the-failure\nfalse\necho after-the-failure\n",
        &[],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(1), "{out}");
    assert!(out.stdout.contains("before-the-failure"), "{out}");
    assert!(!out.stdout.contains("after-the-failure"), "{out}");
    // Line 3: the harness's SCRIPT_START line comes first.
    assert!(
        out.stdout
            .contains("podvm-init: the script exited with status 1 at line 3: false"),
        "{out}"
    );
}

#[test]
fn guest_script_using_an_unset_variable_fails() {
    if !kvm_available() {
        return;
    }
    let out = run_guest_script("echo \"[$no_such_variable]\"\necho not-reached\n", &[]);
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(2), "{out}");
    assert!(!out.stdout.contains("not-reached"), "{out}");
}

#[test]
fn guest_poweroff_ends_podvm_with_exit_0() {
    if !kvm_available() {
        return;
    }
    let out = run_guest_script("echo about-to-power-off\npoweroff -f\nsleep 30\n", &[]);
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("about-to-power-off"), "{out}");
    assert_eq!(
        out.script_status(),
        None,
        "the script never finished\n{out}"
    );
    assert!(out.stderr.contains("guest powered off"), "{out}");
}

#[test]
fn guest_reboot_ends_podvm_with_exit_3() {
    if !kvm_available() {
        return;
    }
    let out = run_guest_script("echo about-to-reboot\nreboot -f\nsleep 30\n", &[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a reboot has its own exit status\n{out}"
    );
    assert!(out.stdout.contains("about-to-reboot"), "{out}");
    assert_eq!(
        out.script_status(),
        None,
        "the script never finished\n{out}"
    );
    assert!(out.stderr.contains("guest rebooted"), "{out}");
}

#[test]
fn guest_reads_what_is_typed_on_the_console() {
    if !kvm_available() {
        return;
    }
    // The prompt comes after the console is open, so nothing typed is lost to the driver's
    // start-up FIFO reset.
    let script = "echo READY-FOR-INPUT\nread -r line\necho \"GOT=[$line]\"\n";
    let out = podvm_tests::run_guest_interactive(script, &[("READY-FOR-INPUT", "typed words\n")]);
    assert!(out.status.success(), "{out}");
    assert_eq!(out.value("GOT").as_deref(), Some("[typed words]"), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
}

#[test]
fn sigterm_presses_power_button_and_guest_powers_off_cleanly() {
    if !kvm_available() {
        return;
    }
    let out = podvm_tests::run_guest_signal_on(
        "echo READY-FOR-SIGTERM\nsleep 300\n",
        &[],
        "READY-FOR-SIGTERM",
        libc::SIGTERM,
    );
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("power button pressed"), "{out}");
    assert!(
        out.stderr.contains("pressing the ACPI power button"),
        "{out}"
    );
    assert!(out.stderr.contains("guest powered off"), "{out}");
}

#[test]
fn guest_ignoring_power_button_is_stopped_after_timeout() {
    if !kvm_available() {
        return;
    }
    let out = podvm_tests::run_guest_signal_on(
        "killall acpid\necho READY-FOR-SIGTERM\nsleep 300\n",
        &["--shutdown-timeout", "3"],
        "READY-FOR-SIGTERM",
        libc::SIGTERM,
    );
    assert_eq!(out.status.code(), Some(4), "{out}");
    assert!(
        out.stderr
            .contains("did not power off within the shutdown timeout"),
        "{out}"
    );
    assert!(
        out.stderr.contains("podvm: error: the guest was stopped"),
        "{out}"
    );
}

/// Without a script the test guest is the demo's: `/init` configures the NIC by DHCP, as a
/// cloud image would, and starts a shell on the console, whose `exit` ends the VM.
#[test]
fn guest_shell_starts_with_its_nic_configured_by_dhcp() {
    if !kvm_available() {
        return;
    }
    let out = podvm_tests::run_guest_shell(
        &["--net", "user"],
        "echo ADDR=$(ip -4 -o addr show dev eth0 | awk '{ print $4 }')\n\
         echo ROUTE=$(ip route show default)\n\
         echo MTU=$(cat /sys/class/net/eth0/mtu)\n\
         exit\n",
    );
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout
            .contains("podvm-init: eth0: 10.0.2.2/24, gateway 10.0.2.1"),
        "/init says what DHCP gave\n{out}"
    );
    assert_eq!(out.value("ADDR").as_deref(), Some("10.0.2.2/24"), "{out}");
    assert!(
        out.value("ROUTE")
            .is_some_and(|r| r.starts_with("default via 10.0.2.1 dev eth0")),
        "{out}"
    );
    assert_eq!(out.value("MTU").as_deref(), Some("65520"), "{out}");
}
