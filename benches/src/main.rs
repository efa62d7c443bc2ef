//! `boot-bench`: podvm and QEMU booting the same guest, side by side in one run.
//!
//! For each run (the VMMs alternate, so drift affects both alike) it measures, from process
//! start: the time until a marker line appears on the guest console, and the time until the
//! process exits. With `--halt-kernel` (a guest that prints the same line and then idles),
//! it also measures each VMM's own memory: resident set minus the resident part of guest RAM,
//! read from /proc/PID/smaps once the line is out, and the peak (VmHWM) minus the same guest
//! part. Medians are reported, with each figure's ratio to podvm's.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Boot time and VMM memory: podvm vs QEMU microvm, same guest, same run")]
struct Args {
    /// Runs per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Guest kernel (PVH ELF or bzImage).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initrd.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (both VMMs get the same).
    #[arg(long)]
    cmdline: Option<String>,
    /// The console line whose arrival is timed.
    #[arg(long)]
    marker: String,
    /// A guest that prints the marker and then idles, for the memory measurement.
    #[arg(long)]
    halt_kernel: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// The podvm binary.
    #[arg(long, default_value = "target/release/podvm")]
    podvm: PathBuf,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Give up on one boot after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Podvm,
    QemuMicrovm,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Podvm => "podvm",
            Vmm::QemuMicrovm => "QEMU microvm",
        }
    }

    fn command(self, args: &Args, kernel: &PathBuf) -> Command {
        let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
        let mem = args.memory.to_string();
        match self {
            Vmm::Podvm => {
                let mut cmd = Command::new(&args.podvm);
                cmd.args(["run", "--memory", &mem, "--kernel"]).arg(kernel);
                if let Some(initrd) = &args.initrd {
                    cmd.arg("--initrd").arg(initrd);
                }
                if let Some(cmdline) = &args.cmdline {
                    cmd.args(["--cmdline", cmdline]);
                }
                if pvm {
                    cmd.arg("--allow-pvm");
                }
                cmd
            }
            Vmm::QemuMicrovm => {
                let mut cmd = Command::new(&args.qemu);
                // PVM refuses writes to MSR_IA32_ARCH_CAPABILITIES, which `-cpu host` makes.
                let cpu = if pvm {
                    "host,arch-capabilities=off"
                } else {
                    "host"
                };
                cmd.args(["-M", "microvm", "-accel", "kvm", "-cpu", cpu, "-smp", "1"])
                    .args([
                        "-m",
                        &mem,
                        "-nodefaults",
                        "-no-user-config",
                        "-display",
                        "none",
                    ])
                    .args(["-serial", "stdio", "-no-reboot", "-kernel"])
                    .arg(kernel);
                if let Some(initrd) = &args.initrd {
                    cmd.arg("-initrd").arg(initrd);
                }
                if let Some(cmdline) = &args.cmdline {
                    cmd.args(["-append", cmdline]);
                }
                cmd
            }
        }
    }
}

struct Boot {
    to_line: Duration,
    to_exit: Duration,
}

struct Memory {
    own_kib: u64,
    own_peak_kib: u64,
}

/// Starts the VMM; the receiver gets the instant the marker line arrives on its stdout.
fn spawn(mut cmd: Command, marker: &str) -> (Child, Instant, mpsc::Receiver<Instant>) {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let marker = marker.as_bytes().to_vec();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Every line is read, so the VMM never blocks on a full pipe.
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if line.windows(marker.len()).any(|w| w == marker.as_slice()) {
                let _ = tx.send(Instant::now());
            }
        }
    });
    (child, start, rx)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn boot(vmm: Vmm, args: &Args) -> Boot {
    let (mut child, start, marker) = spawn(vmm.command(args, &args.kernel), &args.marker);
    let timeout = Duration::from_secs(args.timeout);
    let Ok(line_at) = marker.recv_timeout(timeout) else {
        kill(&mut child);
        panic!("{}: marker {:?} never appeared", vmm.name(), args.marker);
    };
    let deadline = start + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let exit_at = Instant::now();
                assert!(status.success(), "{} exited with {status}", vmm.name());
                return Boot {
                    to_line: line_at - start,
                    to_exit: exit_at - start,
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            _ => {
                kill(&mut child);
                panic!("{}: did not exit after the guest stopped", vmm.name());
            }
        }
    }
}

/// Sums "Rss:" over all mappings, and over the mappings that are guest RAM (anonymous,
/// within 8 MiB above the guest's size: QEMU rounds its RAM block up for alignment).
fn rss_split(pid: u32, guest_bytes: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let lo = u64::from_str_radix(lo, 16).unwrap_or(0);
            let hi = u64::from_str_radix(hi, 16).unwrap_or(0);
            let size = hi.saturating_sub(lo);
            let anonymous = line.split_whitespace().count() <= 5;
            in_guest = anonymous && size >= guest_bytes && size <= guest_bytes + (8 << 20);
        } else if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    (total, guest)
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn memory(vmm: Vmm, args: &Args, halt_kernel: &PathBuf) -> Memory {
    let (mut child, _, marker) = spawn(vmm.command(args, halt_kernel), &args.marker);
    let seen = marker
        .recv_timeout(Duration::from_secs(args.timeout))
        .is_ok();
    if !seen {
        kill(&mut child);
        panic!(
            "{}: marker never appeared with the halting guest",
            vmm.name()
        );
    }
    // Let start-up work that follows the line (if any) settle before reading.
    std::thread::sleep(Duration::from_millis(200));
    let (total, guest) = rss_split(child.id(), args.memory << 20);
    let peak = peak_rss_kib(child.id());
    kill(&mut child);
    Memory {
        own_kib: total - guest,
        own_peak_kib: peak.saturating_sub(guest),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args = Args::parse();
    let vmms = [Vmm::Podvm, Vmm::QemuMicrovm];
    let mut boots: Vec<Vec<Boot>> = vmms.iter().map(|_| Vec::new()).collect();
    for run in 0..args.runs {
        for (i, vmm) in vmms.iter().enumerate() {
            let b = boot(*vmm, &args);
            eprintln!(
                "run {run} {}: line {:.1} ms, exit {:.1} ms",
                vmm.name(),
                b.to_line.as_secs_f64() * 1e3,
                b.to_exit.as_secs_f64() * 1e3
            );
            boots[i].push(b);
        }
    }
    let mems: Option<Vec<(f64, f64)>> = args.halt_kernel.as_ref().map(|k| {
        vmms.iter()
            .map(|vmm| {
                let samples: Vec<Memory> = (0..args.runs).map(|_| memory(*vmm, &args, k)).collect();
                (
                    median(samples.iter().map(|m| m.own_kib as f64 / 1024.0).collect()),
                    median(
                        samples
                            .iter()
                            .map(|m| m.own_peak_kib as f64 / 1024.0)
                            .collect(),
                    ),
                )
            })
            .collect()
    });

    let line: Vec<f64> = boots
        .iter()
        .map(|b| median(b.iter().map(|x| x.to_line.as_secs_f64() * 1e3).collect()))
        .collect();
    let exit: Vec<f64> = boots
        .iter()
        .map(|b| median(b.iter().map(|x| x.to_exit.as_secs_f64() * 1e3).collect()))
        .collect();
    println!(
        "median of {} runs, {} MiB guest, marker {:?}\n",
        args.runs, args.memory, args.marker
    );
    print!("| VMM | to marker line (ms) | to exit (ms) |");
    if mems.is_some() {
        print!(" VMM RSS (MiB) | VMM peak RSS (MiB) |");
    }
    println!();
    print!("|---|---|---|");
    if mems.is_some() {
        print!("---|---|");
    }
    println!();
    for (i, vmm) in vmms.iter().enumerate() {
        print!(
            "| {} | {:.1} (x{:.2}) | {:.1} (x{:.2}) |",
            vmm.name(),
            line[i],
            line[i] / line[0],
            exit[i],
            exit[i] / exit[0]
        );
        if let Some(m) = &mems {
            print!(
                " {:.2} (x{:.2}) | {:.2} (x{:.2}) |",
                m[i].0,
                m[i].0 / m[0].0,
                m[i].1,
                m[i].1 / m[0].1
            );
        }
        println!();
    }
}
