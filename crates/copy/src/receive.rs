//! The receiving end: a stream checked piece by piece into a new image.

use std::io::Read;

use zerocopy::FromBytes;

use crate::stream::{Header, Kind, Packet, MARKER, MAX_DATA};
use crate::{Error, Result};

/// Where the received disk goes.
pub trait Sink {
    /// Make the image: `size` bytes in clusters of `cluster`, in
    /// `format` (stream::FORMAT_*).
    fn create(&mut self, size: u64, cluster: u64, format: u32) -> std::result::Result<(), String>;
    fn write(&mut self, data: &[u8], pos: u64) -> std::result::Result<(), String>;
    /// Make a range read as zeros.
    fn zero(&mut self, pos: u64, len: u64) -> std::result::Result<(), String>;
    /// The stream ended well: make the image durable and consistent.
    fn finish(&mut self) -> std::result::Result<(), String>;
    /// The stream failed: take away what `create` made.
    fn abandon(&mut self);
}

#[derive(Clone, Debug, Default)]
pub struct RecvStats {
    pub size: u64,
    pub stream_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub passes: u64,
}

/// Read a stream into `sink`. Anything wrong (a checksum, a range past
/// the disk, a stream cut short) abandons the image and says what.
pub fn receive(input: &mut dyn Read, sink: &mut dyn Sink) -> Result<RecvStats> {
    let mut stats = RecvStats::default();
    let mut header = [0u8; size_of::<Header>()];
    read_exact(input, &mut header, "the stream's header")?;
    let h = Header::read_from_bytes(&header).map_err(|_| Error::Stream("short header".into()))?;
    if let Some(p) = h.problem() {
        return Err(Error::Stream(p));
    }
    stats.size = h.size.get();
    stats.stream_bytes = header.len() as u64;
    if let Err(e) = sink.create(h.size.get(), h.cluster.get(), h.format.get()) {
        // What it made before it failed goes too.
        sink.abandon();
        return Err(Error::Sink(e));
    }
    match body(input, sink, h.size.get(), &mut stats) {
        Ok(()) => match sink.finish() {
            Ok(()) => Ok(stats),
            Err(e) => {
                sink.abandon();
                Err(Error::Sink(e))
            }
        },
        Err(e) => {
            sink.abandon();
            Err(e)
        }
    }
}

fn body(input: &mut dyn Read, sink: &mut dyn Sink, size: u64, stats: &mut RecvStats) -> Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let (mut packets, mut covered) = (0u64, 0u64);
    loop {
        let mut raw = [0u8; size_of::<Packet>()];
        read_exact(input, &mut raw, "a packet")?;
        stats.stream_bytes += raw.len() as u64;
        let p = Packet::read_from_bytes(&raw).map_err(|_| Error::Stream("short packet".into()))?;
        if p.marker.get() != MARKER {
            return Err(Error::Stream(format!(
                "bad packet marker {:#x} after {} bytes",
                p.marker.get(),
                stats.stream_bytes - raw.len() as u64
            )));
        }
        let kind = Kind::from_u32(p.kind.get())
            .ok_or_else(|| Error::Stream(format!("unknown packet kind {}", p.kind.get())))?;
        let (pos, len) = (p.pos.get(), p.len.get());
        let inside = || match pos.checked_add(len) {
            Some(end) if end <= size && len > 0 => Ok(()),
            _ => Err(Error::Stream(format!(
                "{} packet at {pos} of {len} bytes lies outside the {size}-byte disk",
                kind.name()
            ))),
        };
        match kind {
            Kind::Data => {
                inside()?;
                if len > MAX_DATA {
                    return Err(Error::Stream(format!(
                        "DATA packet of {len} bytes is too large"
                    )));
                }
                buf.resize(len as usize, 0);
                read_exact(input, &mut buf, "a packet's data")?;
                stats.stream_bytes += len;
                if p.checksum(&buf) != p.crc.get() {
                    return Err(Error::Stream(format!(
                        "checksum mismatch in the data at {pos}"
                    )));
                }
                sink.write(&buf, pos).map_err(Error::Sink)?;
                stats.data_bytes += len;
                packets += 1;
                covered += len;
            }
            Kind::Zero | Kind::Pass | Kind::End => {
                if p.checksum(&[]) != p.crc.get() {
                    return Err(Error::Stream(format!(
                        "checksum mismatch in a {} packet",
                        kind.name()
                    )));
                }
                match kind {
                    Kind::Zero => {
                        inside()?;
                        sink.zero(pos, len).map_err(Error::Sink)?;
                        stats.zero_bytes += len;
                        packets += 1;
                        covered += len;
                    }
                    Kind::Pass => stats.passes = pos,
                    _ => {
                        if (pos, len) != (packets, covered) {
                            return Err(Error::Stream(format!(
                                "the sender sent {pos} pieces of {len} bytes, {packets} of {covered} came"
                            )));
                        }
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn read_exact(input: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<()> {
    input.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Stream(format!("the stream ended before {what} (sender gone?)"))
        } else {
            Error::io(format!("reading {what}"), e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::send::{send, Control, SendOptions, Source, Start};
    use crate::stream::FORMAT_PLOOP;
    use std::sync::Mutex;

    /// A disk in memory whose "container" writes between passes.
    struct Mem {
        data: Mutex<Vec<u8>>,
    }
    impl Source for Mem {
        fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }
    struct Writer<'a> {
        disk: &'a Mem,
        cluster: u64,
        round: u64,
        frozen: bool,
        dirty: Vec<(u64, u64)>,
    }
    impl Control for Writer<'_> {
        fn take_dirty(&mut self) -> std::result::Result<(u64, Vec<(u64, u64)>), String> {
            // Fewer writes each round, none once frozen.
            if !self.frozen && self.round < 4 {
                let mut d = self.disk.data.lock().unwrap();
                for k in 0..(8 >> self.round) {
                    let c = (k * 7 + self.round * 3) % (d.len() as u64 / self.cluster);
                    let at = (c * self.cluster) as usize;
                    d[at..at + 100].fill(self.round as u8 + 1);
                    self.dirty.push((c, 1));
                }
                self.round += 1;
            }
            let size = self.disk.data.lock().unwrap().len() as u64;
            Ok((size, std::mem::take(&mut self.dirty)))
        }
        fn freeze(&mut self) -> std::result::Result<(), String> {
            self.frozen = true;
            Ok(())
        }
        fn thaw(&mut self) -> std::result::Result<(), String> {
            self.frozen = false;
            Ok(())
        }
    }
    #[derive(Default)]
    struct MemSink {
        data: Vec<u8>,
        finished: bool,
        abandoned: bool,
    }
    impl Sink for MemSink {
        fn create(&mut self, size: u64, _: u64, _: u32) -> std::result::Result<(), String> {
            self.data = vec![0xee; size as usize];
            Ok(())
        }
        fn write(&mut self, data: &[u8], pos: u64) -> std::result::Result<(), String> {
            self.data[pos as usize..pos as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, pos: u64, len: u64) -> std::result::Result<(), String> {
            self.data[pos as usize..(pos + len) as usize].fill(0);
            Ok(())
        }
        fn finish(&mut self) -> std::result::Result<(), String> {
            self.finished = true;
            Ok(())
        }
        fn abandon(&mut self) {
            self.abandoned = true;
        }
    }

    fn stream_of(disk: &Mem, cluster: u64) -> (Vec<u8>, crate::SendStats) {
        let size = disk.data.lock().unwrap().len() as u64;
        let mut ctl = Writer {
            disk,
            cluster,
            round: 0,
            frozen: false,
            dirty: Vec::new(),
        };
        let mut out = Vec::new();
        let stats = send(
            disk,
            &mut ctl,
            Start {
                size,
                cluster,
                held: vec![(0, size)],
            },
            &mut out,
            &SendOptions {
                max_passes: 8,
                keep_frozen: false,
                format: FORMAT_PLOOP,
            },
            &|_, _| {},
            &mut || Ok(()),
        )
        .unwrap();
        (out, stats)
    }

    fn disk(size: usize) -> Mem {
        let mut d = vec![0u8; size];
        for (i, b) in d.iter_mut().enumerate().take(size / 2) {
            *b = (i * 31 % 251) as u8;
        }
        Mem {
            data: Mutex::new(d),
        }
    }

    #[test]
    fn what_arrives_is_the_disk_at_the_freeze() {
        let cluster = 64 << 10;
        let src = disk(4 << 20);
        let (stream, stats) = stream_of(&src, cluster);
        assert!(stats.passes.len() >= 3, "{:?}", stats.passes);
        let mut sink = MemSink::default();
        let got = receive(&mut stream.as_slice(), &mut sink).unwrap();
        assert!(sink.finished && !sink.abandoned);
        assert!(sink.data == *src.data.lock().unwrap(), "content differs");
        assert_eq!(got.stream_bytes, stream.len() as u64);
        // The zero half went as ranges, not bytes.
        assert!(got.data_bytes < 3 << 20, "{}", got.data_bytes);
    }

    #[test]
    fn any_flipped_bit_or_cut_abandons_the_image() {
        let cluster = 64 << 10;
        let src = disk(1 << 20);
        let (stream, _) = stream_of(&src, cluster);
        // Every 997th byte flipped in turn, and cuts at the same places.
        for at in (0..stream.len()).step_by(997) {
            let mut bad = stream.clone();
            bad[at] ^= 0x10;
            let mut sink = MemSink::default();
            let r = receive(&mut bad.as_slice(), &mut sink);
            assert!(r.is_err(), "a flip at {at} went through");
            assert!(!sink.finished);
            let mut sink = MemSink::default();
            let r = receive(&mut &stream[..at], &mut sink);
            assert!(r.is_err(), "a cut at {at} went through");
            assert!(!sink.finished);
        }
    }

    proptest::proptest! {
        /// Hostile streams: never a panic, never a write outside the disk.
        #[test]
        fn garbage_is_refused_cleanly(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), size in 1u64..64) {
            let mut s = zerocopy::IntoBytes::as_bytes(&crate::stream::Header::new(FORMAT_PLOOP, size * 512, 4096)).to_vec();
            s.extend_from_slice(&tail);
            let mut sink = MemSink::default();
            let _ = receive(&mut s.as_slice(), &mut sink);
        }
    }
}
