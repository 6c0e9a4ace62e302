//! Fault-injecting backend for tests: a disk that fills up, a flush that
//! fails, and a volatile write cache that a simulated power cut empties.
//!
//! Every write lands in the live image at once (what readers see) and in a
//! list of unflushed operations; `flush` makes them durable. A crash keeps
//! the durable image plus any chosen subset of the unflushed operations, the
//! way a drive cache may write back some of them in any order.

use std::io;
use std::sync::Mutex;

use crate::{BlockIo, MemIo};

#[derive(Clone, Copy, Debug, Default)]
pub struct FaultPlan {
    /// Writes after this many succeed fail with ENOSPC.
    pub fail_writes_after: Option<u64>,
    /// Every flush fails with EIO and, as Linux does with pages whose
    /// write-back failed, the writes it would have made durable are lost
    /// to the disk (readers still see them until a crash).
    pub fail_flush: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
    SetLen(u64),
}

pub struct FaultyIo {
    live: MemIo,
    state: Mutex<State>,
}

struct State {
    durable: MemIo,
    unflushed: Vec<Op>,
    plan: FaultPlan,
    writes: u64,
}

impl FaultyIo {
    pub fn new(name: &str) -> Self {
        Self {
            live: MemIo::new(name),
            state: Mutex::new(State {
                durable: MemIo::new(name),
                unflushed: Vec::new(),
                plan: FaultPlan::default(),
                writes: 0,
            }),
        }
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        let mut st = self.state.lock().expect("faulty lock");
        st.plan = plan;
        st.writes = 0;
    }

    /// The image after a power cut: durable content plus the unflushed
    /// operations for which `keep(index)` is true, applied in order.
    pub fn crash_image(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let st = self.state.lock().expect("faulty lock");
        let img = MemIo::from_bytes("crash", st.durable.snapshot());
        for (i, op) in st.unflushed.iter().enumerate() {
            if keep(i) {
                apply(&img, op).expect("memory op");
            }
        }
        img.snapshot()
    }

    /// The content readers see now.
    pub fn live_image(&self) -> Vec<u8> {
        self.live.snapshot()
    }
}

fn apply(img: &MemIo, op: &Op) -> io::Result<()> {
    match op {
        Op::Write(off, data) => img.write_at(data, *off),
        Op::Punch(off, len) => img.punch_hole(*off, *len),
        Op::SetLen(len) => img.set_len(*len),
    }
}

impl BlockIo for FaultyIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().expect("faulty lock");
        if let Some(limit) = st.plan.fail_writes_after {
            if st.writes >= limit {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
        }
        st.writes += 1;
        self.live.write_at(buf, offset)?;
        st.unflushed.push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut st = self.state.lock().expect("faulty lock");
        if st.plan.fail_flush {
            st.unflushed.clear();
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let ops = std::mem::take(&mut st.unflushed);
        for op in &ops {
            apply(&st.durable, op)?;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().expect("faulty lock");
        self.live.punch_hole(offset, len)?;
        st.unflushed.push(Op::Punch(offset, len));
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().expect("faulty lock");
        self.live.set_len(len)?;
        st.unflushed.push(Op::SetLen(len));
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        self.live.size()
    }

    fn describe(&self) -> String {
        self.live.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_drops_unflushed_writes() {
        let f = FaultyIo::new("t");
        f.write_at(b"abc", 0).unwrap();
        f.flush().unwrap();
        f.write_at(b"xyz", 0).unwrap();
        assert_eq!(f.live_image(), b"xyz");
        assert_eq!(f.crash_image(|_| false), b"abc");
        assert_eq!(f.crash_image(|_| true), b"xyz");
    }

    #[test]
    fn full_disk_and_failed_flush() {
        let f = FaultyIo::new("t");
        f.set_plan(FaultPlan {
            fail_writes_after: Some(1),
            fail_flush: true,
        });
        f.write_at(b"a", 0).unwrap();
        assert_eq!(f.write_at(b"b", 1).unwrap_err().raw_os_error(), Some(28));
        assert!(f.flush().is_err());
    }
}
