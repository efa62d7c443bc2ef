//! A pod's network for a test: the test thread moves into a fresh network namespace that
//! plays the pod (address 10.244.0.5 on `eth0`, default route via 10.244.0.1), and a second
//! namespace plays a peer on the cluster network (10.244.0.1), joined by a veth pair.
//! podvm started from the thread runs in the pod; sockets the test opens after
//! [`PodNet::enter_peer`] live in the peer. Needs root and iproute2's `ip`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The pod's address and the peer's, as the test sees them.
pub const POD_IP: &str = "10.244.0.5";
pub const PEER_IP: &str = "10.244.0.1";
pub const POD_IP6: &str = "fd00:10:244::5";
pub const PEER_IP6: &str = "fd00:10:244::1";

/// The two namespaces; dropping it leaves the thread in the pod namespace (the test thread
/// ends soon after) and stops the peer's holder process.
pub struct PodNet {
    pod: File,
    peer: File,
    holder: Child,
    ip: PathBuf,
}

/// iproute2's `ip` (busybox's cannot make veth pairs).
pub fn iproute2() -> Option<PathBuf> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .arg("-V")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("iproute2"))
        })
}

fn this_thread_ns() -> File {
    File::open("/proc/thread-self/ns/net").expect("open /proc/thread-self/ns/net")
}

fn unshare_net() {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
}

fn enter(ns: &File) {
    // SAFETY: `ns` is an open network-namespace file; setns moves only the calling thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

#[allow(clippy::new_without_default)] // building namespaces is not a default
impl PodNet {
    /// Builds the pod and the peer and leaves the calling thread in the pod. Panics (the
    /// test needs it) without root or iproute2.
    pub fn new() -> Self {
        let ip = iproute2()
            .expect("iproute2's ip is needed for the network tests (apt-get install iproute2)");
        unshare_net();
        let pod = this_thread_ns();
        unshare_net();
        let peer = this_thread_ns();
        // Something living in the peer namespace that `ip ... netns PID` can name.
        let holder = Command::new("sleep")
            .arg("100000")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the peer namespace's holder");
        let net = Self {
            pod,
            peer,
            holder,
            ip,
        };
        net.ip(&["link", "set", "lo", "up"]);
        enter(&net.pod);
        net.ip(&["link", "set", "lo", "up"]);
        let holder = net.holder.id().to_string();
        net.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", "netns", &holder,
        ]);
        net.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
        net.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{POD_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        net.ip(&["link", "set", "eth0", "up"]);
        enter(&net.peer);
        net.ip(&["addr", "add", &format!("{PEER_IP}/24"), "dev", "eth1"]);
        net.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{PEER_IP6}/64"),
            "dev",
            "eth1",
            "nodad",
        ]);
        net.ip(&["link", "set", "eth1", "up"]);
        enter(&net.pod);
        net.ip(&["route", "add", "default", "via", PEER_IP]);
        net.ip(&["-6", "route", "add", "default", "via", PEER_IP6]);
        // What Kubernetes runtimes set in every pod: unprivileged ping sockets for all groups.
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
            .expect("allow ping sockets in the pod");
        net
    }

    /// Runs `ip ARGS` in the calling thread's namespace; it must succeed.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new(&self.ip).args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Moves the calling thread into the pod namespace.
    pub fn enter_pod(&self) {
        enter(&self.pod);
    }

    /// Moves the calling thread into the peer namespace.
    pub fn enter_peer(&self) {
        enter(&self.peer);
    }

    /// Runs `f` in the peer namespace (for opening its sockets) and comes back to the pod.
    pub fn in_peer<T>(&self, f: impl FnOnce() -> T) -> T {
        self.enter_peer();
        let result = f();
        self.enter_pod();
        result
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
