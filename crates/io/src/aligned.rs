//! Buffers aligned for O_DIRECT, built without `unsafe`: a vector a little
//! larger than needed, used from its first aligned byte.

/// Alignment that satisfies O_DIRECT on every device we meet (4 KiB sectors).
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose start is aligned to [`DIRECT_ALIGN`].
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::zeroed(0));
}

/// Run `f` with this thread's reusable aligned buffer of at least `len`
/// bytes (contents undefined). Saves a large allocation per request on hot
/// paths. `f` must not call `with_scratch` again.
pub fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            *buf = AlignedBuf::zeroed(len.next_power_of_two());
        }
        f(&mut buf.as_mut_slice()[..len])
    })
}

/// True when a buffer and a file range can go to O_DIRECT as they are,
/// on a file that takes direct I/O in blocks of `align` bytes.
pub fn is_direct_ready(ptr: *const u8, offset: u64, len: usize, align: usize) -> bool {
    (ptr as usize).is_multiple_of(align)
        && offset.is_multiple_of(align as u64)
        && len.is_multiple_of(align)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }
}
