//! What the end-to-end tests need from the machine, checked in one place. A test whose
//! precondition is missing (FUSE, root, a tool) returns early in a local run, and the test
//! runner counts it as passed; so this test fails instead, naming each missing piece and
//! how to install it, and a newcomer sees what did not run. `ALKFS_ALLOW_SKIPS=1` accepts a
//! partial run (what did not run is still printed). Under CI (`.ci/run`) every piece is
//! installed first, and a test whose precondition is missing fails on its own.

mod common;

use std::path::Path;
use std::process::Command;

/// One thing some tests need: whether it is here, what it is for, how to get it.
struct Need {
    here: bool,
    what: &'static str,
    install: &'static str,
}

fn runs(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().is_ok()
}

#[test]
fn the_machine_has_what_the_end_to_end_tests_need() {
    let needs = [
        Need { here: Path::new("/dev/fuse").exists(), what: "/dev/fuse: the mount tests mount FUSE filesystems", install: "a kernel with FUSE (modprobe fuse)" },
        Need { here: common::have_tool("fusermount3") || runs("fusermount3", "-V"), what: "fusermount3: the mount tests", install: "fuse3" },
        Need { here: common::is_root(), what: "root: the full-disk (tmpfs) and partition (iptables) tests", install: "run the tests as root" },
        Need { here: common::have_tool("iptables"), what: "iptables: the partition tests drop packets between nodes", install: "iptables" },
        Need { here: common::libfaketime().is_some(), what: "libfaketime: the clock-skew tests", install: "faketime" },
        Need { here: common::have_tool("strace"), what: "strace: the durability tests read what reaches the kernel", install: "strace" },
        Need { here: runs("sftp", "-h") && runs("ssh-keygen", "-?"), what: "OpenSSH's sftp and ssh-keygen: the SFTP tests", install: "openssh-client" },
        Need { here: common::have_tool("sshfs") || runs("sshfs", "-V"), what: "sshfs: the SFTP tests", install: "sshfs" },
        Need { here: common::have_tool("rclone"), what: "rclone: the SFTP tests", install: "rclone" },
        Need { here: common::have_tool("sqlite3"), what: "sqlite3: the mount tests run it on a mount", install: "sqlite3" },
        Need { here: common::have_tool("rsync"), what: "rsync: the mount tests run it on a mount", install: "rsync" },
        Need { here: common::have_tool("git"), what: "git: the mount tests run it on a mount", install: "git" },
        Need { here: common::have_tool("cc"), what: "a C compiler: the pjdfstest test builds the POSIX suite", install: "gcc" },
        Need {
            here: Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/pjdfstest/pjdfstest.c").exists(),
            what: "../shared/tools/pjdfstest: the pjdfstest test's sources",
            install: "the project's shared folder beside the checkout",
        },
    ];
    let missing: Vec<&Need> = needs.iter().filter(|n| !n.here).collect();
    if missing.is_empty() {
        return;
    }
    let packages: Vec<&str> = missing.iter().map(|n| n.install).filter(|i| !i.contains(' ')).collect();
    let mut report = format!("{} of what the end-to-end tests need is missing here, so the tests that need it returned early (not run):\n", missing.len());
    for n in &missing {
        report.push_str(&format!("  - {}\n", n.what));
    }
    if !packages.is_empty() {
        report.push_str(&format!("Install: sudo apt-get install {}\n", packages.join(" ")));
    }
    if std::env::var_os("ALKFS_ALLOW_SKIPS").is_some_and(|v| v == "1") {
        eprintln!("{report}(accepted: ALKFS_ALLOW_SKIPS=1)");
        return;
    }
    panic!("{report}Or accept a partial run with ALKFS_ALLOW_SKIPS=1.");
}
