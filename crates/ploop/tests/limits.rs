//! Per-disk I/O limits for real: a mounted disk's device read with
//! O_DIRECT runs at its limit (and far faster without), the limit changes
//! while the disk is in use, invalid limits are refused, and the counters
//! see what was asked. Needs root, /dev/fuse and loop devices.

mod common;

use std::fs;
use std::time::Instant;

use common::{data, ok, ploop, run, tempdir, Mounted};

/// Read `count` blocks of `bs` bytes from `dev` with O_DIRECT; bytes per
/// second.
fn read_rate(dev: &str, bs: u64, count: u64) -> f64 {
    let t = Instant::now();
    ok(
        run(
            "dd",
            &[
                &format!("if={dev}"),
                "of=/dev/null",
                &format!("bs={bs}"),
                &format!("count={count}"),
                "iflag=direct",
                "status=none",
            ],
        ),
        "dd",
    );
    (bs * count) as f64 / t.elapsed().as_secs_f64()
}

/// A number in `ploop stat --json`'s stats.
fn stat(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("\"{key}\": ")))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("{key} in {out}"))
}

#[test]
fn limits_hold_change_online_and_refuse_nonsense() {
    let dir = tempdir();
    let img = dir.path().join("root.hdd");
    ok(
        ploop(&["init", "-s", "512M", "-t", "none", img.to_str().unwrap()]),
        "init",
    );
    let dd = dir.path().join("DiskDescriptor.xml");
    let dd = dd.to_str().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(1, 200 << 20)).unwrap();
    ok(ploop(&["write", dd, src.to_str().unwrap()]), "write");

    // Refused before anything starts.
    for bad in [
        vec!["--iops-limit", "abc"],
        vec!["--bps-limit", "12X"],
        vec!["--iops-burst", "5"],
        vec!["--bps-burst", "1M"],
        vec!["--iops-limit", "-5"],
    ] {
        let mut args = vec!["mount"];
        args.extend(&bad);
        args.push(dd);
        let out = ploop(&args);
        assert!(!out.ok(), "{bad:?} accepted: {out}");
    }
    let out = ploop(&["set-limits", "--iops-limit", "10", dd]);
    assert!(!out.ok() && out.stderr.contains("not mounted"), "{out}");

    // Unlimited first: the figure the limits must bind well below.
    let dev = ok(ploop(&["mount", dd]), "mount").trim().to_string();
    let _m = Mounted(dd.to_string());
    let free = read_rate(&dev, 1 << 20, 100);
    ok(ploop(&["umount", dd]), "umount");

    // 20 MiB/s for about 3 s: held within 10% (the default burst is a
    // tenth of a second's worth).
    let limit = 20u64 << 20;
    let dev = ok(ploop(&["mount", "--bps-limit", "20M", dd]), "mount")
        .trim()
        .to_string();
    assert!(
        free > 3.0 * limit as f64,
        "unlimited {free:.0} B/s: too slow to tell a limit"
    );
    let rate = read_rate(&dev, 1 << 20, 60);
    assert!(
        rate <= 1.1 * limit as f64 && rate >= 0.5 * limit as f64,
        "{rate:.0} B/s under a limit of {limit} (unlimited {free:.0})"
    );
    let list = ok(ploop(&["list", "--json"]), "list");
    assert!(list.contains(&format!("\"bps\": {limit}")), "{list}");

    // Changed online: 200 requests per second, the byte limit removed.
    let out = ok(
        ploop(&["set-limits", "--iops-limit", "200", "--bps-limit", "0", dd]),
        "set-limits",
    );
    assert!(
        out.contains("iops 200") && !out.contains("bytes/s"),
        "{out}"
    );
    let iops = read_rate(&dev, 4096, 600) / 4096.0;
    assert!(
        (100.0..=220.0).contains(&iops),
        "{iops:.0} requests/s under a limit of 200"
    );
    // Refused online too, the old limits kept.
    let out = ploop(&["set-limits", "--bps-burst", "1M", dd]);
    assert!(!out.ok() && out.stderr.contains("burst"), "{out}");

    // The counters saw it all: 60 MiB and 600 requests of 4 KiB, at
    // least (the kernel may read ahead or split).
    let st = ok(ploop(&["stat", "--json", dd]), "stat");
    assert!(stat(&st, "read_bytes") >= (60 << 20) + 600 * 4096, "{st}");
    assert!(stat(&st, "reads") >= 600, "{st}");
    assert!(stat(&st, "throttled") > 0, "{st}");
    assert!(st.contains("\"iops\": 200"), "{st}");
    ok(ploop(&["umount", dd]), "umount");

    // In a cgroup of the host's blkio hierarchy (v1 here; v2's folders
    // take the same --cgroup): the daemon is in it, so blkio applies.
    let root = [
        "/sys/fs/cgroup/blkio",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .into_iter()
    .find(|r| std::path::Path::new(r).join("cgroup.procs").exists())
    .expect("a cgroup hierarchy");
    let cg = std::path::Path::new(root).join(format!("ploop-test-{}", std::process::id()));
    fs::create_dir(&cg).unwrap();
    let out = ploop(&["mount", "--cgroup", cg.to_str().unwrap(), dd]);
    // This disk's daemon (other tests may have disks mounted meanwhile).
    let recs: serde_json::Value =
        serde_json::from_str(&ok(ploop(&["list", "--json"]), "list")).unwrap();
    let want = fs::canonicalize(dd).unwrap();
    let pid = recs.as_array().unwrap().iter().find_map(|r| {
        let d = r["descriptor"].as_str()?;
        (std::path::Path::new(d) == want).then(|| r["pid"].to_string())
    });
    let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    ok(ploop(&["umount", dd]), "umount");
    fs::remove_dir(&cg).unwrap();
    ok(out, "mount --cgroup");
    let pid = pid.expect("a pid in list --json");
    assert!(procs.lines().any(|l| l == pid), "{pid} not in {procs}");
    let out = ploop(&["mount", "--cgroup", "/nonexistent/cgroup", dd]);
    assert!(!out.ok(), "{out}");
}
