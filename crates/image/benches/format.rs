//! Format-layer throughput beside a raw file, in one run, with O_DIRECT on
//! both sides: `cargo bench -p ploop-image --bench format`.
//!
//! Environment: BENCH_DIR (default /var/tmp), BENCH_MIB (region, default
//! 512), BENCH_SECS (per random job, default 3).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ploop_format::ploop::{CreateOptions, OpenFlags, PloopDelta, Version};
use ploop_image::{Chain, Delta};
use ploop_io::{AlignedBuf, BlockIo, FileIo, OpenMode};

const MIB: u64 = 1 << 20;

trait Target {
    fn read(&self, buf: &mut [u8], off: u64);
    fn write(&self, buf: &[u8], off: u64);
    fn sync(&self);
}

struct RawFile(FileIo);
impl Target for RawFile {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_at(buf, off).unwrap()
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_at(buf, off).unwrap()
    }
    fn sync(&self) {
        self.0.flush().unwrap()
    }
}

struct Ploop(Chain);
impl Target for Ploop {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_at(buf, off).unwrap()
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_at(buf, off).unwrap()
    }
    fn sync(&self) {
        self.0.flush().unwrap()
    }
}

fn open_raw(path: &Path) -> RawFile {
    let _ = std::fs::remove_file(path);
    RawFile(FileIo::open(path, OpenMode::create().direct(true)).unwrap())
}

fn open_ploop(path: &Path, size: u64) -> Ploop {
    let _ = std::fs::remove_file(path);
    let io = Arc::new(FileIo::open(path, OpenMode::create().direct(true)).unwrap());
    PloopDelta::create(
        io.clone(),
        CreateOptions {
            virtual_size: size,
            cluster_size: MIB,
            version: Version::V2,
            preallocate: false,
        },
    )
    .unwrap();
    let delta = PloopDelta::open(
        io,
        OpenFlags {
            writable: true,
            allow_dirty: false,
        },
    )
    .unwrap();
    Ploop(Chain::new(vec![Arc::new(Delta::Ploop(delta))], MIB, size).unwrap())
}

/// Sequential pass over the region in 1 MiB requests; MiB/s.
fn seq(t: &dyn Target, size: u64, write: bool) -> f64 {
    let mut buf = AlignedBuf::zeroed(MIB as usize);
    buf.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8 | 1);
    let start = Instant::now();
    for off in (0..size).step_by(MIB as usize) {
        if write {
            t.write(buf.as_slice(), off);
        } else {
            t.read(buf.as_mut_slice(), off);
        }
    }
    if write {
        t.sync();
    }
    (size / MIB) as f64 / start.elapsed().as_secs_f64()
}

/// 4 KiB random requests for `secs`; IOPS.
fn random(t: &dyn Target, size: u64, write: bool, secs: f64) -> f64 {
    let mut buf = AlignedBuf::zeroed(4096);
    buf.as_mut_slice().fill(0x5a);
    let blocks = size / 4096;
    let mut rng = ploop_test_support::Rng::new(1);
    let deadline = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < deadline {
        for _ in 0..64 {
            let off = rng.below(blocks) * 4096;
            if write {
                t.write(buf.as_slice(), off);
            } else {
                t.read(buf.as_mut_slice(), off);
            }
        }
        n += 64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let size = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512u64)
        * MIB;
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let dir = Path::new(&dir);
    let raw = open_raw(&dir.join("ploop-bench.raw"));
    let ploop = open_ploop(&dir.join("ploop-bench.hdd"), size);
    println!(
        "format layer vs raw file, O_DIRECT, one thread, {} MiB region, {secs} s per random job",
        size / MIB
    );
    println!(
        "{:<34} {:>12} {:>12} {:>7} {:>6}",
        "job", "raw", "ploop1", "ratio", "goal"
    );
    let row = |name: &str, unit: &str, goal: f64, f: &dyn Fn(&dyn Target) -> f64| {
        let r = f(&raw);
        let p = f(&ploop);
        let ratio = p / r;
        println!(
            "{name:<34} {:>8.0} {unit:<3} {:>8.0} {unit:<3} {ratio:>7.2} {:>5}{}",
            r,
            p,
            format!("{goal:.1}x"),
            if ratio >= goal { "" } else { "  <- below goal" }
        );
    };
    row("1M seq first write (allocation)", "MB/s", 0.7, &|t| {
        seq(t, size, true)
    });
    row("1M seq overwrite", "MB/s", 0.8, &|t| seq(t, size, true));
    row("1M seq read (allocated)", "MB/s", 0.9, &|t| {
        seq(t, size, false)
    });
    row("4K random read (allocated)", "IOPS", 0.9, &|t| {
        random(t, size, false, secs)
    });
    row("4K random overwrite", "IOPS", 0.8, &|t| {
        random(t, size, true, secs)
    });
    let clusters = size / MIB;
    println!(
        "BAT memory: {} bytes for {clusters} clusters ({} bytes per cluster)",
        clusters * 4,
        4
    );
    drop(ploop);
    let _ = std::fs::remove_file(dir.join("ploop-bench.raw"));
    let _ = std::fs::remove_file(dir.join("ploop-bench.hdd"));
}
