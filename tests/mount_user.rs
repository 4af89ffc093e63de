//! A mount by an ordinary user, not root: made in the test (root makes the user, and gives
//! `/dev/fuse` the mode stock Debian ships, 0666), with a node and data dir of that user's.
//! It mounts with a stock `/etc/fuse.conf`, says "mounted" only once the kernel has the
//! mount, works, and unmounts itself when its process is killed.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::{can_mount, is_mounted};
use common::{await_cond, precondition, KillOnDrop, BIN};

const USER: &str = "alkfs-test";

/// `PROGRAM ARGS` as the test user: `setpriv` drops to the user and execs the program, so
/// the child is the program itself (a kill reaches it, not a wrapper).
fn as_user_cmd(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", USER, "--regid", USER, "--init-groups", "--", program]).env("HOME", "/tmp").env_remove("RUST_LOG").env_remove("XDG_DATA_HOME");
    c
}

/// `alkfs --data DATA ARGS` as the test user.
fn as_user(data: &Path, args: &[&str]) -> Command {
    let mut c = as_user_cmd(BIN);
    c.arg("--data").arg(data).args(args).env("ALKFS_NET_LISTEN", "127.0.0.1:0").env("ALKFS_NET_RELAY", "disabled");
    c
}

fn as_user_sh(script: &str) -> std::process::Output {
    as_user_cmd("sh").args(["-c", script]).output().unwrap()
}

#[test]
fn an_ordinary_users_mount_says_mounted_only_once_it_is_works_and_unmounts_itself_when_killed() {
    if !can_mount() || !precondition(common::is_root(), "making an ordinary user for the test needs root") {
        return;
    }
    let _ = Command::new("useradd").args(["-m", USER]).stderr(Stdio::null()).status();
    assert!(Command::new("id").arg(USER).stdout(Stdio::null()).status().unwrap().success(), "the test user exists");
    fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
    let base = tempfile::Builder::new().prefix("alkfs-user-").tempdir_in("/tmp").unwrap();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(Command::new("chown").args([USER, base.path().to_str().unwrap()]).status().unwrap().success());
    let data = base.path().join("data");
    let mnt: PathBuf = base.path().join("mnt");
    assert!(as_user_sh(&format!("mkdir {}", mnt.display())).status.success());
    let node_log = base.path().join("node.log");
    let _node = KillOnDrop(as_user(&data, &["node", "run"]).stdout(Stdio::null()).stderr(fs::File::create(&node_log).unwrap()).spawn().unwrap());
    await_cond(Duration::from_secs(30), "the user's node to answer", || as_user(&data, &["status"]).output().is_ok_and(|o| o.status.success()));

    let log = base.path().join("mount.log");
    let mut mount = KillOnDrop(as_user(&data, &["mount", mnt.to_str().unwrap()]).stdout(Stdio::null()).stderr(fs::File::create(&log).unwrap()).spawn().unwrap());
    let started = Instant::now();
    loop {
        let said = fs::read_to_string(&log).unwrap_or_default();
        if said.contains("mounted default:main") {
            assert!(is_mounted(&mnt), "it said mounted before the kernel had the mount: {said}");
            break;
        }
        if let Ok(Some(st)) = mount.0.try_wait() {
            panic!("the user's mount exited with {st}: {said}");
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no mount after 15 s: {said}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let wrote = as_user_sh(&format!("echo 'written by a user' > {0}/hello.txt && sync {0}/hello.txt", mnt.display()));
    assert!(wrote.status.success(), "{}", String::from_utf8_lossy(&wrote.stderr));
    let got = as_user(&data, &["get", "/hello.txt"]).output().unwrap();
    assert_eq!(got.stdout, b"written by a user\n", "{}", String::from_utf8_lossy(&got.stderr));

    // Killed: nothing of it stays mounted (a dead mount point fails every access with ENOTCONN).
    mount.0.kill().unwrap();
    mount.0.wait().unwrap();
    let killed = Instant::now();
    await_cond(Duration::from_secs(15), "the killed mount to be unmounted", || !is_mounted(&mnt));
    assert!(fs::read_dir(&mnt).is_ok(), "the mount point is a plain directory again");
    eprintln!("the user's mount was unmounted {:?} after its process was killed", killed.elapsed());
}
