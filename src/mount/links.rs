//! Where a mount's symlinks lead. A link's target is stored as its writer gave it, and any
//! member of a bucket can write one: `/docs/report.txt -> /home/u/.bashrc` from a peer, and
//! the next `echo >> ~/alk/docs/report.txt` on this machine would append to the host file.
//! So a mount shows every link inside the bucket, as SFTP does: an absolute target names a
//! path of the bucket (the mount point is put before it), and `..` stops at the bucket's
//! root. A relative target that stays inside is shown as stored. `alkfs mount
//! --outside-links` shows every target as stored, for a user who trusts every member.
//!
//! The other way, a link made through the mount to a path inside the mount point is stored
//! as the bucket's path, so it leads to the same file on every machine whatever the mount
//! point there.

use std::path::Path;

use alknet_actors::proto::path::TreePath;

/// The bucket path `target` names from a link at `link`, `..` stopping at the root.
fn inside(link: &TreePath, target: &str) -> String {
    let parent = link.parent().map(|p| p.as_str().to_string()).unwrap_or_default();
    let mut parts: Vec<&str> = if target.starts_with('/') { Vec::new() } else { parent.split('/').filter(|c| !c.is_empty()).collect() };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Whether relative `target` of a link at `link` climbs above the bucket's root.
fn climbs_out(link: &TreePath, target: &str) -> bool {
    let mut depth = link.parent().map(|p| p.as_str().split('/').filter(|c| !c.is_empty()).count()).unwrap_or(0) as i64;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// The target the kernel is given for the link at `link` whose stored target is `target`,
/// on a mount at `mountpoint` (absolute): inside the bucket (see the module's notes).
pub fn shown(link: &TreePath, target: &str, mountpoint: &Path) -> String {
    if !target.starts_with('/') && !climbs_out(link, target) {
        return target.to_string();
    }
    let inside = inside(link, target);
    format!("{}{}", mountpoint.display().to_string().trim_end_matches('/'), if inside == "/" { "" } else { &inside })
}

/// The target to store for a link made through a mount at `mountpoint`: one naming a path
/// inside the mount point becomes that bucket path; any other is stored as written.
pub fn stored(target: &str, mountpoint: &Path) -> String {
    let mount = mountpoint.display().to_string();
    let mount = mount.trim_end_matches('/');
    match target.strip_prefix(mount) {
        Some("") => "/".to_string(),
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        _ => target.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(link: &str, target: &str, want: &str) {
        let got = shown(&TreePath::parse(link).unwrap(), target, Path::new("/home/u/alk"));
        assert_eq!(got, want, "{link} -> {target}");
    }

    #[test]
    fn every_link_is_shown_inside_the_bucket() {
        // A peer's link to a host file leads into the mount instead.
        check("/docs/report.txt", "/home/u/.bashrc", "/home/u/alk/home/u/.bashrc");
        check("/docs/report.txt", "../../../../etc/passwd", "/home/u/alk/etc/passwd");
        check("/a", "/", "/home/u/alk");
        check("/a", "/x/../../y", "/home/u/alk/y");
        // Relative links that stay inside are left alone.
        check("/docs/report.txt", "notes.md", "notes.md");
        check("/docs/deep/x", "../../top", "../../top");
        check("/docs/x", "./../y/./z", "./../y/./z");
    }

    #[test]
    fn a_link_made_to_a_path_in_the_mount_is_stored_as_the_bucket_path() {
        let m = Path::new("/home/u/alk");
        assert_eq!(stored("/home/u/alk/docs/x", m), "/docs/x");
        assert_eq!(stored("/home/u/alk", m), "/");
        assert_eq!(stored("/home/u/alkfs/x", m), "/home/u/alkfs/x", "a sibling directory is not inside");
        assert_eq!(stored("relative/x", m), "relative/x");
        // And shown back where it was made.
        assert_eq!(shown(&TreePath::parse("/l").unwrap(), &stored("/home/u/alk/docs/x", m), m), "/home/u/alk/docs/x");
    }
}
